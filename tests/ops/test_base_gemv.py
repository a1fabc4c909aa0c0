"""Base GEMV: the CPU reference against FORMATS.md, and the Numba kernel against the reference.

Without DECDEC_GPU_TESTS=1 the kernels run in Numba's CUDA simulator on tiny shapes; with it (and a
GPU) every comparison runs on the device, plus the `gpu`-marked ones at Llama-3-8B shapes.
"""

from tests.ops.cudasim import GPU_RUN, ON_GPU, SIMULATED, cuda, gpu, kernels  # noqa: F401 - first: the simulator

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from decdec.ops import base_gemv as bg  # noqa: E402
from decdec.ops.act import act_mul_reference  # noqa: E402
from decdec.ops.norm import rms_norm  # noqa: E402
from tests.ops.test_norm import norm_args  # noqa: E402



def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [out, in] -> int32 qweight, written straight from FORMATS.md (a second, independent packer)."""
    codes = np.asarray(codes, np.uint64)
    out_features, in_features = codes.shape
    if bits == 4:
        words = (codes.reshape(out_features, -1, 8) << (4 * np.arange(8, dtype=np.uint64))).sum(-1)
    else:
        units = codes.reshape(out_features, -1, 32)
        two = 2 * np.arange(16, dtype=np.uint64)
        words = np.stack([((units[..., :16] & 3) << two).sum(-1), ((units[..., 16:] & 3) << two).sum(-1),
                          ((units >> 2) << np.arange(32, dtype=np.uint64)).sum(-1)], axis=-1)
    return words.reshape(out_features, -1).astype(np.uint32).view(np.int32)


def random_linear(rng, bits: int, out_features: int, in_features: int, group_size: int = 128):
    """Fresh random (codes, qweight, scales, zeros, act_scale): never zeros, integer zero points."""
    groups = -(-in_features // group_size)
    codes = rng.integers(0, 2**bits, (out_features, in_features))
    scales = (rng.random((out_features, groups)) * 0.02 + 0.005).astype(np.float16)
    zeros = rng.integers(0, 2**bits, (out_features, groups)).astype(np.float16)
    act_scale = (rng.random(in_features) + 0.5).astype(np.float32)
    return codes, pack_codes(codes, bits), scales, zeros, act_scale


def assert_close_fp16(got: np.ndarray, ref: np.ndarray) -> None:
    """fp16 output of a float32 accumulation: within fp16 rounding of the output's scale; all written."""
    assert not np.isnan(got).any(), f"{np.isnan(got).sum()} outputs were never written"
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * float(np.abs(ref).max()))


# ---------------------------------------------------------------------------------------------------
# reference


@pytest.mark.parametrize("bits", [3, 4])
def test_unpack_reads_formats_layout(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, (3, 64))
    q = pack_codes(codes, bits).view(np.uint32)
    literal = np.zeros_like(codes)
    for o in range(3):  # FORMATS.md, element by element
        for i in range(64):
            if bits == 4:
                literal[o, i] = (int(q[o, i // 8]) >> (4 * (i % 8))) & 0xF
            else:
                w = q[o, 3 * (i // 32): 3 * (i // 32) + 3].astype(np.int64)
                j = i % 32
                lo = (w[0] >> (2 * j)) & 3 if j < 16 else (w[1] >> (2 * (j - 16))) & 3
                literal[o, i] = lo | (((w[2] >> j) & 1) << 2)
    assert (literal == codes).all()
    assert (bg.unpack_codes(torch.from_numpy(pack_codes(codes, bits)), bits, 64).numpy() == codes).all()


@pytest.mark.parametrize("bits", [3, 4])
def test_reference_is_dequantized_matmul(bits):
    rng = np.random.default_rng(10 + bits)
    codes, q, scales, zeros, act = random_linear(rng, bits, 5, 576)  # 576: a last partial group of 64
    x = rng.standard_normal((2, 576)).astype(np.float32)
    group = np.arange(576) // 128
    w = (codes - zeros.astype(np.float64)[:, group]) * scales.astype(np.float64)[:, group]
    want = (x.astype(np.float64) * act) @ w.T
    got = bg.base_gemv_reference(torch.from_numpy(x), *map(torch.from_numpy, (q, scales, zeros, act)), bits)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [3, 4])
def test_packing_agrees_with_models_quantize(bits):
    quantize = pytest.importorskip("decdec.models.quantize")
    codes = np.random.default_rng(20 + bits).integers(0, 2**bits, (4, 96))
    theirs = quantize.pack_codes(torch.from_numpy(codes), bits).numpy()
    assert (theirs == pack_codes(codes, bits)).all()


@pytest.mark.parametrize("bits", [3, 4])
def test_plan_covers_k_in_whole_steps_within_the_staging(bits):
    for out_features, in_features in [(4096, 4096), (28672, 4096), (4096, 14336), (640, 1024), (576, 1536), (64, 576)]:
        n_groups = -(-in_features // 128)  # whole groups, a partial last one too
        for rows_per_warp in (16, 32):
            p = bg.plan_gemv(out_features, in_features, bits, rows_per_warp=rows_per_warp, k_warps=1)
            assert p.groups_per_kblock * bg.MMA_GROUP <= bg.STAGE_INPUTS and p.tile_rows == 8 * rows_per_warp
            assert (p.k_blocks - 1) * p.groups_per_kblock < n_groups <= p.k_blocks * p.groups_per_kblock
        p = bg.plan_gemv(out_features, in_features, bits)
        assert p.groups_per_kblock * bg.MMA_GROUP <= bg.STAGE_INPUTS
        assert p.tile_rows == p.rows_per_warp * 8 // p.k_warps and p.tile_rows in (16, 32, 128, 256)
        assert (p.k_blocks - 1) * p.groups_per_kblock < n_groups <= p.k_blocks * p.groups_per_kblock
    # short shapes: 8 warps split K inside a block of 16 rows, one K block; large ones: K blocks instead
    p = bg.plan_gemv(4096, 4096, bits)
    assert (p.k_warps, p.k_blocks, p.tile_rows, p.early_load) == (8, 1, 32, True)  # 128 blocks of 32 rows
    p = bg.plan_gemv(6144, 4096, bits)
    assert p.k_warps == 1 and p.k_blocks > 1 and not p.early_load  # 64 row tiles alone would leave most SMs idle
    with pytest.raises(ValueError, match="k_warps"):
        bg.plan_gemv(64, 256, bits, k_warps=3)
    with pytest.raises(ValueError):
        bg.plan_gemv(64, 100, bits)
    with pytest.raises(ValueError, match="rows_per_warp"):
        bg.plan_gemv(64, 256, bits, rows_per_warp=8, k_warps=1)
    with pytest.raises(ValueError, match="groups of 128"):  # the only group size the config allows
        bg.plan_gemv(64, 256, bits, group_size=64)
    with pytest.raises(ValueError, match="groups of 128"):
        bg.BaseGemv(None, None, None, None, bits, group_size=64)


@pytest.mark.parametrize("bits", [3, 4])
def test_mma_layout_is_the_documented_order(bits, monkeypatch):
    """The tensor-core kernel's device copy, read back word by word as docs/FORMATS.md describes it;
    two row chunks (LAYOUT_ROWS) and padded rows / inputs included."""
    monkeypatch.setattr(bg, "LAYOUT_ROWS", 128)
    out_features, in_features, tile_rows = 150, 576, 128
    codes = np.random.default_rng(60 + bits).integers(0, 2**bits, (out_features, in_features))
    flat = bg.mma_layout(torch.from_numpy(pack_codes(codes, bits)), bits, in_features, tile_rows).numpy()
    flat = flat.view(np.uint32).astype(np.int64)
    rows, groups = 256, 5  # padded to whole tiles and groups
    words = bg.MMA_GROUP_WORDS[bits]
    assert flat.size == rows // 16 * groups * words
    got = np.full((rows, groups * 128), -1)
    for T in range(rows // 16):
        for G in range(groups):
            base = (T * groups + G) * words
            for h in range(2):
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    for m in range(4):
                        for j in range(8):
                            if bits == 4:
                                code = flat[base + h * 128 + lane * 4 + m] >> (4 * j) & 15
                            else:  # slot s = 4 m + j % 4, the high half for j >= 4
                                word = [flat[base + lane * 4 + h * 2 + w] for w in range(2)]
                                word.append(flat[base + 128 + lane * 2 + h])
                                s, half = 4 * m + j % 4, 16 * (j // 4)
                                if s < 15:
                                    code = word[s // 5] >> (half + (0, 3, 6, 10, 13)[s % 5]) & 7
                                else:
                                    code = sum((word[b] >> (half + 9) & 1) << b for b in range(3))
                            got[16 * T + 8 * h + g, 128 * G + 32 * t + 8 * m + j] = code
    want = np.zeros_like(got)
    want[:out_features, :in_features] = codes
    assert (got == want).all()


# ---------------------------------------------------------------------------------------------------
# kernel (simulator, tiny shapes)


def run_kernel(rng, bits, out_features, in_features, k_blocks=None, rows_per_warp=None, x=None, **plan_args):
    _, q, scales, zeros, act = random_linear(rng, bits, out_features, in_features)
    x = rng.standard_normal(in_features).astype(np.float16) if x is None else x
    ref = bg.base_gemv_reference(torch.from_numpy(x.astype(np.float32)),
                                 *map(torch.from_numpy, (q, scales, zeros, act)), bits).numpy()
    plan = bg.plan_gemv(out_features, in_features, bits, rows_per_warp=rows_per_warp, k_blocks=k_blocks, **plan_args)
    gemv = bg.BaseGemv(*(cuda.to_device(a) for a in (q, scales, zeros, act)), bits, plan=plan)
    out = cuda.to_device(np.full(out_features, np.nan, np.float16))  # poison: every row must be written
    xd = cuda.to_device(x)
    gemv(xd, out)
    return out.copy_to_host().astype(np.float32), ref, gemv, xd, out


@kernels
@pytest.mark.parametrize("bits, out_features, in_features, rows_per_warp, k_blocks, n_sm, tiles_per_block", [
    (4, 40, 576, 16, None, 132, 1),  # partial tile, a partial last group (zero-padded), K in 5 parts
    (4, 392, 128, 16, 1, 1, 2),  # 4 tiles on 3 block slots: blocks stream 2 tiles (the last partial), direct write
    (4, 40, 256, 32, 2, 132, 1),  # two mma tiles per warp, K split in 2
    (4, 520, 256, 16, 1, 1, 2),  # 2 tiles x 2 steps per block: the next tile's loads go out during a tile's last step
    (3, 40, 576, 16, None, 132, 1),  # 3-bit: low and high bit planes, a partial last group, K in 5 parts
    (3, 24, 256, 32, 1, 132, 1),  # 3-bit, two mma tiles per warp, direct write
])
def test_tensor_core_kernel_matches_reference(bits, out_features, in_features, rows_per_warp, k_blocks, n_sm,
                                              tiles_per_block):
    rng = np.random.default_rng(500 + out_features + in_features + bits)
    got, ref, gemv, xd, out = run_kernel(rng, bits, out_features, in_features, k_blocks, rows_per_warp=rows_per_warp,
                                         n_sm=n_sm, k_warps=1)
    assert gemv.plan.tiles_per_block == tiles_per_block
    assert_close_fp16(got, ref)


@kernels
@pytest.mark.parametrize("bits, out_features, in_features, rows_per_warp, k_warps, k_blocks, n_sm, tiles_per_block", [
    (4, 40, 576, 16, 8, 1, 132, 1),  # 8 warps on 5 groups: 3 warps' only step is past the end (dropped)
    (4, 100, 512, 16, 4, 2, 1, 3),  # 4 K warps x 2 row warps, K split in 2, blocks stream 2 or 1 tiles
    (3, 72, 640, 32, 2, 2, 132, 1),  # 3-bit, two mma tiles per warp, 2 K warps, K split: 3 and 2 groups
    (3, 72, 384, 16, 8, 1, 1, 2),  # 3-bit, 16-row tiles streamed 2 per block, direct write (shared sums reused)
])
def test_tensor_core_kernel_with_k_warps_matches_reference(bits, out_features, in_features, rows_per_warp, k_warps,
                                                           k_blocks, n_sm, tiles_per_block):
    """Warps of a block splitting its K range: their row sums meet in shared memory at each tile's end."""
    rng = np.random.default_rng(700 + out_features + in_features + bits)
    got, ref, gemv, xd, out = run_kernel(rng, bits, out_features, in_features, k_blocks, rows_per_warp=rows_per_warp,
                                         n_sm=n_sm, k_warps=k_warps)
    p = gemv.plan
    assert (p.k_warps, p.tile_rows, p.tiles_per_block) == (k_warps, 128 * rows_per_warp // 16 // k_warps, tiles_per_block)
    assert_close_fp16(got, ref)
    gemv(xd, out)  # counters reset by the first launch; the parts and the K warps sum in a fixed order
    assert (out.copy_to_host().astype(np.float32) == got).all()


@kernels
def test_beside_another_kernel_fits_one_wave_of_the_sms_left():
    """`beside`: a plan whose grid fits the block slots of the SMs a correction leaves stays; one that does
    not is re-planned for those SMs (here fewer K blocks), and merges with a split output of its own plan."""
    rng = np.random.default_rng(11)
    got, ref, gemv, xd, out = run_kernel(rng, 3, 256, 2048, rows_per_warp=16, n_sm=3, k_warps=1)
    assert gemv.beside(gemv.n_sm - 3) is gemv  # 3 SMs left: 9 slots for 2 tiles x 4 K blocks
    twin = gemv.beside(gemv.n_sm - 2)  # 2 SMs left: 6 slots
    p, q = gemv.plan, twin.plan
    assert (p.grid, q.grid) == ((2, 4), (2, 3)) and q.tiles_per_block == 1
    assert (q.tile_rows, q.k_warps) == (p.tile_rows, p.k_warps) and twin.weights is gemv.weights
    with pytest.raises(ValueError, match="another GEMV plan"):  # the first plan's split: 4 K parts, not 3
        twin(xd, out, merge=gemv.split_output())
    out2 = cuda.to_device(np.full(256, np.nan, np.float16))
    twin(xd, out2, merge=twin.split_output())
    assert_close_fp16(out2.copy_to_host().astype(np.float32), ref)
    assert_close_fp16(got, ref)


@kernels
def test_tensor_core_kernel_scales_wide_ranges_without_overflow():
    """fp16 operands: the block's inputs are scaled by a power of two so that the largest is ~2^14; an input
    of 6e4 (x * act_scale ~ 9e4 > fp16's 65504) must neither overflow nor wipe out the small ones."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal(256) * 1e-3).astype(np.float16)
    x[17] = 6e4
    got, ref, *_ = run_kernel(rng, 4, 24, 256, 1, rows_per_warp=16, x=x)
    assert_close_fp16(got, ref)
    x[17] = 0  # and only tiny inputs: scaled up, not lost to fp16 subnormals
    got, ref, *_ = run_kernel(np.random.default_rng(9), 4, 24, 256, 1, rows_per_warp=16, x=x)
    assert_close_fp16(got, ref)


def fused_reference(rng, prologue, in_features, act, norm_weight):
    """(kernel input, act_scale to pass, reference x~ @ W^T) for a prologue, from the ops' CPU references:
    x~ = rms_norm(x, w) * act_scale (x float32) or act_mul(gate_up) * act_scale (gate_up fp16)."""
    if prologue == "rms_norm":
        x = (rng.standard_normal(in_features) * 3).astype(np.float32)
        h = rms_norm(torch.from_numpy(x), torch.from_numpy(norm_weight), 1e-5)
        return x, norm_weight * act, h
    gate_up = rng.standard_normal(2 * in_features).astype(np.float16)
    args = norm_args("gemma3" if prologue == "gelu_tanh" else "llama")
    return gate_up, act, act_mul_reference(args, torch.from_numpy(gate_up)).float()


@kernels
@pytest.mark.parametrize("prologue, bits, out_features, in_features, k_blocks, k_warps, residual", [
    ("rms_norm", 4, 40, 576, None, 1, False),  # K in 5 blocks: each sums the squares outside its own range
    ("rms_norm", 3, 72, 384, 1, 8, True),  # one K block stages all of x; K warps; the residual add, direct
    ("silu", 4, 40, 576, None, 1, True),  # the activation of gate_up's two halves; residual add at the arrival
    ("gelu_tanh", 3, 24, 256, 1, 1, False),
])
def test_folded_glue_matches_the_ops_references(prologue, bits, out_features, in_features, k_blocks, k_warps,
                                                residual):
    """The glue folded into the GEMV (`PROLOGUES`, the residual add) against the unfused references: the
    norm or act x up, the GEMV, then + the residual stream (float32 out, poisoned first)."""
    rng = np.random.default_rng(900 + in_features + bits)
    _, q, scales, zeros, act = random_linear(rng, bits, out_features, in_features)
    norm_weight = (rng.random(in_features) + 0.5).astype(np.float32)
    x, scale, h = fused_reference(rng, prologue, in_features, act, norm_weight)
    ref = bg.base_gemv_reference(h, *map(torch.from_numpy, (q, scales, zeros, act)), bits).numpy()
    plan = bg.plan_gemv(out_features, in_features, bits, k_blocks=k_blocks, k_warps=k_warps, rows_per_warp=16)
    gemv = bg.BaseGemv(*(cuda.to_device(a) for a in (q, scales, zeros, act)), bits, plan=plan)
    resid = rng.standard_normal(out_features).astype(np.float32) * 4
    out = cuda.to_device(np.full(out_features, np.nan, np.float32 if residual else np.float16))
    gemv(cuda.to_device(x), out, prologue=prologue, act_scale=cuda.to_device(scale), eps=1e-5,
         resid=cuda.to_device(resid) if residual else None)
    got = out.copy_to_host().astype(np.float32)
    assert_close_fp16(got - resid if residual else got, ref)
    with pytest.raises(ValueError, match="prologue"):
        gemv(cuda.to_device(x[: in_features // 2]), out, prologue=prologue)


# ---------------------------------------------------------------------------------------------------
# real GPU, real shapes


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("out_features, in_features", [(4096, 4096), (14336, 4096), (4096, 14336), (640, 1024),
                                                       (1536, 576)])
def test_kernel_matches_reference_on_gpu(bits, out_features, in_features):
    rng = np.random.default_rng(out_features + in_features + bits)
    codes, q, scales, zeros, act = random_linear(rng, bits, out_features, in_features)
    x = rng.standard_normal(in_features).astype(np.float16)
    w = bg.dequantize(*map(torch.from_numpy, (q, scales, zeros)), bits, in_features).cuda()
    ref = (w.double() @ (torch.from_numpy(x).cuda().double() * torch.from_numpy(act).cuda().double())).cpu().numpy()
    plan = bg.plan_gemv(out_features, in_features, bits, n_sm=cuda.get_current_device().MULTIPROCESSOR_COUNT)
    gemv = bg.BaseGemv(*(cuda.to_device(a) for a in (q, scales, zeros, act)), bits, plan=plan)
    out = cuda.to_device(np.full(out_features, np.nan, np.float16))
    gemv(cuda.to_device(x), out)
    assert_close_fp16(out.copy_to_host().astype(np.float32), ref)
