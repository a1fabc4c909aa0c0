"""int8 lm_head: the kernel against its CPU reference (dequantized weight @ h) on fresh random inputs,
outputs poisoned first; tiny shapes in the simulator, the packaged models' and Llama's on the GPU."""

from tests.ops.cudasim import cuda, gpu, kernels  # noqa: F401 - first: the simulator

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from decdec.ops.lm_head import Int8LmHead, dequantize_rows, quantize_rows_int8  # noqa: E402


def run_lm_head(rows: int, dim: int, seed: int):
    """(got, want) float32 [rows]: the kernel's logits and the reference's, for random w and h."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=gen) * (torch.rand(rows, 1, generator=gen) + 0.1)
    h = torch.randn(dim, generator=gen).half()
    codes, scale = quantize_rows_int8(w)
    want = dequantize_rows(codes, scale) @ h.float()
    out = cuda.to_device(np.full(rows, np.nan, np.float32))
    Int8LmHead(cuda.to_device(codes.numpy()), cuda.to_device(scale.numpy()), cuda.to_device(h.numpy()), out)()
    return out.copy_to_host(), want.numpy()


def test_quantize_rows_int8_round_trip():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    codes, scale = quantize_rows_int8(w)
    assert codes.dtype == torch.uint8 and codes.min() >= 1 and codes.max() <= 255
    err = (dequantize_rows(codes, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()  # round to nearest: within half a step
    assert (w.abs().amax(1) - dequantize_rows(codes, scale).abs().amax(1)).abs().max() < 1e-5  # the row max is kept


@kernels
@pytest.mark.parametrize("rows, dim", [
    (37, 48),  # rows not a multiple of a block's pass (32 rows), 3 vectors a row: lanes 3.. of a group idle
    (70, 1056),  # 66 vectors a row: lanes 0 and 1 of a group take a ninth
    (600, 16),  # more rows than the simulator's grid (2 "SMs" x 8 blocks x 32 rows) takes in one pass
])
def test_kernel_matches_reference(rows, dim):
    got, want = run_lm_head(rows, dim, rows + dim)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rows, dim", [(128256, 4096), (262144, 640), (49152, 576), (1024, 8192)])
def test_kernel_matches_reference_on_gpu(rows, dim):
    got, want = run_lm_head(rows, dim, 0)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_bad_width_is_refused():
    codes = np.zeros((4, 40), np.uint8)  # 40 is not a multiple of 16
    with pytest.raises(ValueError, match="multiple of 16"):
        Int8LmHead(codes, np.ones(4, np.float32), np.zeros(40, np.float16), np.zeros(4, np.float32))
