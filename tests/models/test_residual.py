"""models/residual.py: residual error bounds, scale search, row layout, round trips."""

import pytest
import torch

from decdec.models.quantize import quantize_awq, quantize_rtn
from decdec.models.residual import (
    RESIDUAL_MAX_CODE,
    ResidualTable,
    build_residual,
    effective_weight,
    search_row_scales,
)
from decdec.errors import ArtifactError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rtn_case(out: int = 64, width: int = 576, bits: int = 3, seed: int = 0):
    weight = torch.randn(out, width, generator=_gen(seed)) * 0.02
    q = quantize_rtn(weight, bits)
    return weight, q, build_residual(effective_weight(weight, q), q)


def test_shapes_and_dtypes() -> None:
    _, _, table = _rtn_case(out=64, width=576)
    assert table.rows.dtype == torch.uint8 and table.rows.shape == (576, 32)
    assert table.scales.dtype == torch.float16 and table.scales.shape == (64,)
    assert table.rows.shape[0] == 576 and table.out_features == 64
    nibbles = torch.cat([table.rows & 0xF, table.rows >> 4])
    # nibble = code + 8 with code in [-7, 7]
    assert 8 - RESIDUAL_MAX_CODE <= int(nibbles.min())
    assert int(nibbles.max()) <= 8 + RESIDUAL_MAX_CODE


def _assert_within_half_scale(table: ResidualTable, residual: torch.Tensor) -> None:
    """|R_hat - R| <= scale / 2 wherever |R| <= 7 * scale (beyond it the chosen scale clips)."""
    scale = table.scales.float()[:, None]
    err = (table.dequantize() - residual).abs()
    inside = residual.abs() <= RESIDUAL_MAX_CODE * scale
    assert ((err <= scale / 2 * (1 + 1e-5)) | ~inside).all()


def test_r_hat_within_half_scale() -> None:
    weight, q, table = _rtn_case()
    _assert_within_half_scale(table, weight - q.dequantize())


def _squared_error(residual: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    s = scales.float()[:, None]
    codes = (residual / s).round().clamp(-RESIDUAL_MAX_CODE, RESIDUAL_MAX_CODE)
    return (codes * s - residual).square().sum(1)


def test_grid_search_no_worse_than_max_scale() -> None:
    residual = torch.randn(40, 256, generator=_gen(1))
    residual[:, 0] *= 20.0  # a heavy tail makes the plain max/7 scale wasteful
    searched = search_row_scales(residual)
    plain = (residual.abs().amax(1) / RESIDUAL_MAX_CODE).half()
    err_searched, err_plain = _squared_error(residual, searched), _squared_error(residual, plain)
    assert (err_searched <= err_plain).all()
    assert err_searched.sum() < 0.95 * err_plain.sum()  # measured 0.87: clipping the tail pays off


def test_zero_residual_row_gets_zero_scale() -> None:
    residual = torch.randn(4, 64, generator=_gen(2))
    residual[2] = 0.0
    scales = search_row_scales(residual)
    assert scales[2] == 0 and (scales[[0, 1, 3]] > 0).all()


def test_row_i_is_input_channel_i() -> None:
    _, q, _ = _rtn_case(out=16, width=128)
    deq = q.dequantize()
    channel = 37
    weight_eff = deq.clone()
    weight_eff[:, channel] += torch.linspace(-0.01, 0.01, 16)  # the only nonzero residual column
    table = build_residual(weight_eff, q)
    nonzero_rows = (table.rows != 0x88).any(1).nonzero().flatten().tolist()  # 0x88 = two zero codes
    assert nonzero_rows == [channel]
    picked = table.dequantize_rows(torch.tensor([channel]))[0]
    assert torch.allclose(picked, weight_eff[:, channel] - deq[:, channel], atol=2e-3)


def test_dequantize_rows_matches_table() -> None:
    _, _, table = _rtn_case(out=64, width=576)
    idx = torch.tensor([5, 0, 575, 128, 5])
    assert torch.equal(table.dequantize_rows(idx), table.dequantize()[:, idx].T)


def test_odd_out_features_padded() -> None:
    weight, q, table = _rtn_case(out=33, width=128)
    assert table.rows.shape == (128, 17)
    assert ((table.rows[:, -1] >> 4) == 8).all()  # the missing output 33 is a zero code
    r_hat = table.dequantize()
    assert r_hat.shape == (33, 128)
    _assert_within_half_scale(table, weight - q.dequantize())


def test_tensor_round_trip() -> None:
    _, _, table = _rtn_case(out=33, width=128)
    prefix = "layers.1.down.residual"
    back = ResidualTable.from_tensors(table.to_tensors(prefix), prefix)
    assert back.out_features == 33
    assert torch.equal(back.rows, table.rows) and torch.equal(back.scales, table.scales)
    with pytest.raises(ArtifactError, match="scales must be float16"):
        ResidualTable.from_tensors({"p.rows": table.rows, "p.scales": table.scales.float()}, "p")
    with pytest.raises(ArtifactError, match="rows must be"):  # scales of another layer
        ResidualTable.from_tensors({"p.rows": table.rows, "p.scales": table.scales[:-2]}, "p")
    with pytest.raises(ArtifactError, match="p.rows"):
        ResidualTable.from_tensors({"p.scales": table.scales}, "p")


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_residual_recovers_weight_at_3_bits(method: str) -> None:
    gen = _gen(3)
    weight = torch.randn(128, 384, generator=gen) * 0.02
    if method == "rtn":
        q = quantize_rtn(weight, 3)
    else:
        q = quantize_awq(weight, torch.randn(256, 384, generator=gen), 3, n_grid=5)
    weight_eff = effective_weight(weight, q)
    table = build_residual(weight_eff, q)
    base_err = (weight_eff - q.dequantize()).square().sum()
    fixed_err = (weight_eff - q.dequantize() - table.dequantize()).square().sum()
    assert fixed_err * 10 <= base_err  # measured ~70x lower squared error
