"""Correction: the reference against a dense mask formula, the fused kernel against the reference
(stand-alone and merged into the base GEMV's split output, in both arrival orders), in the simulator;
on a real GPU (DECDEC_GPU_TESTS=1) also at Llama-3-8B shapes with zero-copy rows on two streams."""

from tests.ops.cudasim import GPU_RUN, ON_GPU, SIMULATED, cuda, gpu, kernels  # noqa: F401 - first: the simulator

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from decdec.ops import base_gemv as bg  # noqa: E402
from decdec.ops import correction as co  # noqa: E402
from decdec.ops import dma, selector  # noqa: E402
from tests.ops.test_base_gemv import assert_close_fp16, random_linear  # noqa: E402



def profile(rng, width: int) -> np.ndarray:
    calib = rng.standard_t(df=3, size=(16, width)).astype(np.float32)
    return np.sort(np.abs(calib), axis=-1)[:, ::-1].max(axis=0).astype(np.float32)


def random_residual(rng, width: int, out_features: int):
    """uint8 rows [in, ceil(out / 2)] with codes in [-7, 7] (nibbles 1..15) and fp16 scales [out]."""
    nibbles = rng.integers(1, 16, (width, 2 * -(-out_features // 2)))
    rows = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8)
    scales = (rng.random(out_features) * 0.01 + 0.001).astype(np.float16)
    return rows, scales


def case(rng, width: int, out_features: int, k_chunk: int):
    """Fresh activation (fp16), act_scale, bounds, residual table and a base output."""
    x = rng.standard_t(df=3, size=width).astype(np.float16)
    act = (rng.random(width) + 0.5).astype(np.float32)
    bounds = selector.bucket_bounds(profile(rng, width), k_chunk)
    rows, rscale = random_residual(rng, width, out_features)
    base = rng.standard_normal(out_features).astype(np.float16)
    return x, act, bounds, rows, rscale, base


# ---------------------------------------------------------------------------------------------------
# reference


def test_reference_is_dense_masked_product():
    rng = np.random.default_rng(0)
    width, out_features, k_chunk = 1536, 37, 40  # odd output count: the last byte's high nibble is padding
    rows, rscale = random_residual(rng, width, out_features)
    x = rng.standard_normal((3, width)).astype(np.float32)
    base = rng.standard_normal((3, out_features)).astype(np.float32)
    bounds = selector.bucket_bounds(profile(rng, width), k_chunk)
    mask = selector.selection_mask(selector.select_bucket(torch.from_numpy(x), k_chunk, bounds), width).numpy()
    nib = np.stack([rows & 0xF, rows >> 4], -1).reshape(width, -1)[:, :out_features].astype(np.float64)
    r_hat = (nib - 8).T * rscale.astype(np.float64)[:, None]  # [out, in]
    want = base + (x * mask) @ r_hat.T
    got = co.correction_reference(torch.from_numpy(x), torch.from_numpy(base), rows, rscale, bounds, k_chunk)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_plan_covers_every_tile_once():
    for out_features, n_tb in [(40, 3), (576, 1), (4096, 8), (28672, 4), (28672, 16)]:
        p = co.plan_correction(out_features, n_tb)
        assert p.blocks <= n_tb and p.blocks * p.tiles_per_block >= p.n_tiles
        assert p.wc_n * p.ks_n <= p.threads == co.THREADS


# ---------------------------------------------------------------------------------------------------
# kernel (simulator, tiny shapes)


@kernels
@pytest.mark.parametrize("width, out_features, k_chunk, n_tb", [
    (640, 96, 37, 2),  # two blocks, one tile each; chosen rows split over 64 thread groups
    (576, 40, 1024, 3),  # k_chunk = chunk: every channel; more blocks than tiles
    (2112, 48, 1024, 1),  # three chunks (the last 64 wide) at k_chunk = 1024: two selection passes
    (1536, 200, 64, 1),  # a partial second chunk (512 wide takes 32); one block owns 4 tiles
    (640, 64, 0, 2),  # nothing chosen: out = base
    (3136, 72, 1, 2),  # k_chunk 1 (the atomic-min selection): three full chunks and a 64-wide one in one pass
])
def test_standalone_kernel_matches_reference(width, out_features, k_chunk, n_tb):
    rng = np.random.default_rng(width + out_features + k_chunk)
    x, act, bounds, rows, rscale, base = case(rng, width, out_features, k_chunk)
    xs = torch.from_numpy(x.astype(np.float32)) * torch.from_numpy(act)
    want = co.correction_reference(xs, torch.from_numpy(base), rows, rscale, bounds, k_chunk).numpy()
    out = cuda.to_device(np.full(out_features, np.nan, np.float16))  # poison
    co.correction_cuda(cuda.to_device(x), cuda.to_device(base), cuda.to_device(dma.pad_rows(rows)),
                       cuda.to_device(rscale), bounds, k_chunk, cuda.to_device(act), out=out, n_tb=n_tb)
    assert_close_fp16(out.copy_to_host().astype(np.float32), want)


@kernels
@pytest.mark.parametrize("bits, k_blocks, k_warps, order, out_features, width, k_chunk", [
    (4, 2, 1, ("correction", "base"), 40, 640, 48),  # two steps: either merges; the second reuses reset counters
    (3, None, 1, ("base",), 40, 640, 48),
    (4, 1, 1, ("base",), 200, 640, 48),  # GEMV tiles of 128 rows over merge tiles of 64: 2 + 2 (1 partial) arrivals
    (3, None, None, ("correction", "base"), 40, 640, 48),  # the default here: 8 K warps, 16-row tiles = merge tiles
    (3, 2, 1, ("correction", "base"), 40, 2112, 700),  # 2 chunks a pass: 2 correction parts (chunks 0-1, 2)
    (3, None, None, ("base", "correction"), 40, 3072, 1),  # k_chunk 1: one pick a chunk, three chunks a pass
])
def test_merged_into_base_gemv_in_either_order(bits, k_blocks, k_warps, order, out_features, width, k_chunk):
    """Base K blocks and the correction's passes are parts of one split output: whoever arrives last
    merges."""
    rng = np.random.default_rng(40 + bits + width)
    _, q, scales, zeros, act = random_linear(rng, bits, out_features, width)
    gemv = bg.BaseGemv(*(cuda.to_device(a) for a in (q, scales, zeros, act)), bits,
                       plan=bg.plan_gemv(out_features, width, bits, k_blocks=k_blocks, k_warps=k_warps))
    if k_warps == 1:
        assert gemv.plan.merge_rows == 64 and gemv.plan.tile_rows >= 128  # several merge tiles per GEMV tile
    else:
        assert gemv.plan.k_warps == 8 and gemv.plan.merge_rows == gemv.plan.tile_rows == 16
    _, _, bounds, rows, rscale, _ = case(rng, width, out_features, k_chunk)
    corr = co.Correction(cuda.to_device(dma.pad_rows(rows)), cuda.to_device(rscale), bounds, k_chunk, n_tb=2,
                         tile_rows=gemv.plan.merge_rows)
    assert corr.parts == (2 if k_chunk == 700 else 1)  # a pass takes 4 chunks, 2 at k_chunk 700 (SEL_CAP)
    split = gemv.split_output(extra_parts=corr.parts)
    act_d = cuda.to_device(act)
    with pytest.raises(ValueError, match="disagree"):  # one part too many: the tiles would never complete
        corr(cuda.to_device(np.ones(width, np.float16)), act_d, out=cuda.to_device(np.zeros(out_features, np.float16)),
             merge=gemv.split_output(extra_parts=corr.parts + 1))
    with pytest.raises(ValueError, match="resid"):  # stand-alone, no merged GEMV makes the folded add
        corr(cuda.to_device(np.ones(width, np.float16)), act_d,
             base_out=cuda.to_device(np.zeros(out_features, np.float16)),
             resid=cuda.to_device(np.zeros(out_features, np.float32)))
    for first in order:
        x = rng.standard_t(df=3, size=width).astype(np.float16)
        xt = torch.from_numpy(x.astype(np.float32))
        base_ref = bg.base_gemv_reference(xt, *map(torch.from_numpy, (q, scales, zeros, act)), bits)
        want = co.correction_reference(xt, base_ref, rows, rscale, bounds, k_chunk, act_scale=torch.from_numpy(act))
        x_d = cuda.to_device(x)
        out = cuda.to_device(np.full(out_features, np.nan, np.float16))
        launches = [lambda: gemv(x_d, out, merge=split), lambda: corr(x_d, act_d, out=out, merge=split)]
        for launch in launches if first == "base" else launches[::-1]:
            launch()
        assert_close_fp16(out.copy_to_host().astype(np.float32), want.numpy())
        assert (split.counters.copy_to_host() == 0).all()


@kernels
@pytest.mark.parametrize("prologue, bits, out_features, width, k_chunk, residual", [
    ("rms_norm", 3, 40, 640, 48, True),  # the norm's 1 / rms in every block of both kernels; the residual add
    ("silu", 4, 40, 640, 48, False),  # act x up from gate_up's two halves
    ("gelu_tanh", 3, 40, 1152, 1, True),  # two chunks at k_chunk 1
])
def test_merged_with_the_gemvs_folded_glue(prologue, bits, out_features, width, k_chunk, residual):
    """The correction beside a GEMV whose glue is folded in (`ops.base_gemv.PROLOGUES`): both make x~ from
    the glue's input, so the correction picks and weighs the channels of the unfolded reference (the norm
    or act x up, then the GEMV and the correction, then + the residual stream), merged either way round."""
    from tests.ops.test_base_gemv import fused_reference

    rng = np.random.default_rng(60 + bits + width)
    _, q, scales, zeros, act = random_linear(rng, bits, out_features, width)
    gemv = bg.BaseGemv(*(cuda.to_device(a) for a in (q, scales, zeros, act)), bits,
                       plan=bg.plan_gemv(out_features, width, bits, k_blocks=2, k_warps=1))
    _, _, bounds, rows, rscale, _ = case(rng, width, out_features, k_chunk)
    corr = co.Correction(cuda.to_device(dma.pad_rows(rows)), cuda.to_device(rscale), bounds, k_chunk, n_tb=2,
                         tile_rows=gemv.plan.merge_rows)
    split = gemv.split_output(extra_parts=corr.parts)
    norm_weight = (rng.random(width) + 0.5).astype(np.float32)
    resid = (rng.standard_normal(out_features) * 4).astype(np.float32)
    for first in ("correction", "base"):
        x, scale, h = fused_reference(rng, prologue, width, act, norm_weight)
        base_ref = bg.base_gemv_reference(h, *map(torch.from_numpy, (q, scales, zeros, act)), bits)
        want = co.correction_reference(h, base_ref, rows, rscale, bounds, k_chunk, act_scale=torch.from_numpy(act))
        x_d, scale_d, resid_d = (cuda.to_device(a) for a in (x, scale, resid))
        out = cuda.to_device(np.full(out_features, np.nan, np.float32 if residual else np.float16))
        fold = dict(prologue=prologue, act_scale=scale_d, eps=1e-5, resid=resid_d if residual else None)
        launches = [lambda: gemv(x_d, out, merge=split, **fold),
                    lambda: corr(x_d, out=out, merge=split, **fold)]
        for launch in launches if first == "base" else launches[::-1]:
            launch()
        got = out.copy_to_host().astype(np.float32)
        assert_close_fp16(got - resid if residual else got, want.numpy())
        assert (split.counters.copy_to_host() == 0).all()


# ---------------------------------------------------------------------------------------------------
# real GPU, real shapes: zero-copy rows, base and correction on two streams


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("out_features, width, k_chunk, n_tb", [(4096, 4096, 16, 8), (28672, 4096, 8, 16),
                                                                 (4096, 14336, 32, 8), (1536, 640, 1024, 4),
                                                                 (4096, 14336, 1, 4)])
def test_fused_on_two_streams_on_gpu(bits, out_features, width, k_chunk, n_tb):
    rng = np.random.default_rng(out_features + width + bits)
    _, q, scales, zeros, act = random_linear(rng, bits, out_features, width)
    x, _, bounds, rows, rscale, _ = case(rng, width, out_features, k_chunk)
    xt = torch.from_numpy(x.astype(np.float32))
    w = bg.dequantize(*map(torch.from_numpy, (q, scales, zeros)), bits, width)
    base_ref = (xt.double() * torch.from_numpy(act).double()) @ w.double().T
    want = co.correction_reference(xt, base_ref.float(), rows, rscale, bounds, k_chunk,
                                   act_scale=torch.from_numpy(act)).numpy()
    gemv = bg.BaseGemv(*(cuda.to_device(a) for a in (q, scales, zeros, act)), bits)
    with dma.PinnedTable.from_array(rows) as pinned:
        corr = co.Correction(pinned.device_array(), cuda.to_device(rscale), bounds, k_chunk, n_tb=n_tb,
                             tile_rows=gemv.plan.merge_rows)
        gemv = gemv.beside(corr.blocks)  # as the engine runs it: one wave on the SMs the correction leaves
        split = gemv.split_output(extra_parts=corr.parts)
        x_d, act_d = cuda.to_device(x), cuda.to_device(act)
        out = cuda.to_device(np.full(out_features, np.nan, np.float16))
        main, side = cuda.stream(), cuda.stream()
        for _ in range(3):  # repeated steps: counters must come back to zero each time
            gemv(x_d, out, stream=main, merge=split)
            corr(x_d, act_d, out=out, merge=split, stream=side)
            main.synchronize()
            side.synchronize()
            assert_close_fp16(out.copy_to_host().astype(np.float32), want)
        assert (split.counters.copy_to_host() == 0).all()
