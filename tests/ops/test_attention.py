"""Decode attention: the kernel against its CPU reference (models/arch.py's `attend`) on fresh random qkv
and KV caches, output poisoned; positions 0, inside and at max_seq - 1, GQA groups of 2 and 3, Qwen2's
bias, Gemma's q/k norms, query scale and sliding window, splits that combine, and splits that take
several tiles. Tiny tiles in the simulator; real shapes (`gpu`) on the device."""

from tests.ops.cudasim import cuda, gpu, kernels  # noqa: F401 - first: the simulator

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from decdec.models.arch import KVCache, ModelArgs  # noqa: E402
from decdec.ops.attention import (AttentionScratch, DecodeAttention, decode_attention_reference,  # noqa: E402
                                  plan_attention, rope_table)


def attn_args(family: str, n_heads: int, n_kv_heads: int, head_dim: int, **kw) -> ModelArgs:
    return ModelArgs(family, vocab_size=8, dim=8, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     head_dim=head_dim, ffn_dim=8, norm_eps=1e-6, rope_base=1e4, **kw)


GEMMA = dict(rope_local_base=1e4, sliding_window=20, sliding_pattern=2, query_scale=0.1)  # layer 0 slides


def layer_weights(args: ModelArgs, layer: int, rng) -> dict[str, torch.Tensor]:
    p, qkv = f"layers.{layer}.", args.q_dim + 2 * args.kv_dim
    w = {}
    if args.qkv_bias:
        w[p + "qkv_bias"] = torch.from_numpy(rng.standard_normal(qkv).astype(np.float32))
    if args.is_gemma:
        for name in ("q_norm", "k_norm"):
            w[p + name] = torch.from_numpy((rng.random(args.head_dim) + 0.5).astype(np.float32))
    return w


def check_attention(args: ModelArgs, layer: int, max_seq: int, positions, tile=None, splits=32, seed=0):
    """Run the kernel at each position in turn (the scratch's counters must be back at zero between
    launches) and compare output and cache with the reference."""
    rng = np.random.default_rng(seed)
    weights = layer_weights(args, layer, rng)
    p = f"layers.{layer}."
    shape = (args.n_layers, max_seq, args.n_kv_heads, args.head_dim)
    cache = KVCache(*(torch.from_numpy(rng.standard_normal(shape).astype(np.float16)) for _ in range(2)))
    plan = plan_attention(args, tile, splits)
    scratch = AttentionScratch.allocate(plan)
    base = args.rope_base_of(layer)
    rope = tuple(cuda.to_device(t.numpy()) for t in rope_table(args.head_dim, base, max_seq))
    kc, vc = (cuda.to_device(t.numpy()) for t in (cache.k, cache.v))
    dev = {name: cuda.to_device(weights[p + name].numpy()) for name in ("qkv_bias", "q_norm", "k_norm")
           if p + name in weights}
    qkv_d = cuda.device_array(args.q_dim + 2 * args.kv_dim, np.float16)
    pos_d = cuda.device_array(1, np.int64)
    out = cuda.device_array(args.q_dim, np.float16)
    attn = DecodeAttention(args, layer, plan, scratch, qkv_d, pos_d, kc, vc, out, rope, bias=dev.get("qkv_bias"),
                           q_norm=dev.get("q_norm"), k_norm=dev.get("k_norm"))
    for pos in positions:
        qkv = (rng.standard_normal(args.q_dim + 2 * args.kv_dim) * 2).astype(np.float16)
        want = decode_attention_reference(args, weights, layer, torch.from_numpy(qkv), torch.tensor([pos]), cache)
        qkv_d.copy_to_device(qkv)
        pos_d.copy_to_device(np.array([pos], np.int64))
        out.copy_to_device(np.full(args.q_dim, np.nan, np.float16))  # poison: every output must be written
        attn()
        got = out.copy_to_host().astype(np.float32)
        assert not np.isnan(got).any(), f"position {pos}: {np.isnan(got).sum()} outputs never written"
        want = want.float().numpy()
        np.testing.assert_allclose(got, want, rtol=5e-3, atol=5e-3 * np.abs(want).max(), err_msg=f"position {pos}")
        for dev_cache, ref in ((kc, cache.k), (vc, cache.v)):  # the new row written, nothing else touched
            np.testing.assert_allclose(dev_cache.copy_to_host().astype(np.float32), ref.float().numpy(),
                                       rtol=2e-3, atol=2e-3, err_msg=f"cache at position {pos}")


@kernels
@pytest.mark.parametrize("positions, splits", [
    ([0, 37, 63], 4),  # first position (one key), 3 splits that combine, the last position (4 splits)
    ([63, 37], 2),  # 2 splits of 2 tiles each (online softmax across tiles, then the combine); 2 + 1 tiles
])
def test_llama_gqa_matches_reference(positions, splits):
    check_attention(attn_args("llama", 4, 2, 64), 0, 64, positions, tile=16, splits=splits)


@kernels
@pytest.mark.parametrize("layer, positions, splits", [
    (1, [100], 2),  # 2 rows per lane and tile, 2 tiles per split: the next tile's loads beside the current one
    (0, [40], 1),  # one split over the window (keys 21..40): slots whose first tile's rows are all outside it
])
def test_tiles_of_several_rows_per_lane_match_reference(layer, positions, splits):
    args = attn_args("gemma3", 2, 1, 64, **GEMMA)  # 16 rows at once at head_dim 64
    check_attention(args, layer, 128, positions, tile=32, splits=splits, seed=5)


@kernels
def test_head_dim_32_matches_reference():  # the tiny test models' heads
    check_attention(attn_args("llama", 2, 1, 32), 0, 40, [39], splits=2, seed=3)


@kernels
def test_qwen2_bias_and_groups_of_three_match_reference():
    check_attention(attn_args("qwen2", 6, 2, 64), 1, 48, [20], tile=16, splits=4, seed=1)


@kernels
@pytest.mark.parametrize("layer, positions", [
    (0, [40, 10]),  # sliding: keys 21..40 span two tiles (two splits combine), then 0..10 only
    (1, [40]),  # global layer: keys 0..40
])
def test_gemma3_norms_scale_and_window_match_reference(layer, positions):
    check_attention(attn_args("gemma3", 2, 1, 256, **GEMMA), layer, 48, positions, tile=16, splits=4, seed=2)


@kernels
def test_more_than_64_splits_combine():  # 3 splits per lane of the combine, the last 16-split load round partial;
    check_attention(attn_args("llama", 2, 1, 64), 0, 1200, [1199], tile=16, splits=70, seed=4)  # 5 take 2 tiles


def test_plan_rejects_unsupported_shapes():
    with pytest.raises(ValueError, match="head_dim"):
        plan_attention(attn_args("llama", 4, 2, 96))
    assert plan_attention(attn_args("llama", 4, 2, 32)).tile == 128
    with pytest.raises(ValueError, match="tile"):
        plan_attention(attn_args("llama", 4, 2, 64), tile=8)  # 16 rows at once at head_dim 64
    with pytest.raises(ValueError, match="tile"):
        plan_attention(attn_args("llama", 4, 2, 64), tile=16 * 9)
    p = plan_attention(attn_args("llama", 32, 8, 128))
    assert (p.tile, p.group, p.grid) == (32, 4, (8, 32))
    gemma = plan_attention(attn_args("gemma3", 4, 1, 256, **GEMMA))
    assert (gemma.tile, gemma.grid) == (16, (1, 64))  # 4 rows at once at head_dim 256; one kv head: more splits
    assert plan_attention(attn_args("llama", 9, 3, 64)).tile == 64
    with pytest.raises(ValueError, match="splits"):
        plan_attention(attn_args("llama", 4, 2, 64), splits=257)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name, args, layer", [
    ("llama3-8b", attn_args("llama", 32, 8, 128), 0),
    ("smollm2", attn_args("llama", 9, 3, 64), 0),
    ("gemma3-270m-sliding", attn_args("gemma3", 4, 1, 256, rope_local_base=1e4, sliding_window=512,
                                      sliding_pattern=6, query_scale=0.0625), 0),
    ("gemma3-270m-global", attn_args("gemma3", 4, 1, 256, rope_local_base=1e4, sliding_window=512,
                                     sliding_pattern=6, query_scale=0.0625), 5),
])
def test_real_shapes_match_reference_on_gpu(name, args, layer):
    args = ModelArgs(**{**args.__dict__, "n_layers": layer + 1})
    check_attention(args, layer, 8192, [0, 255, 1000, 4096, 8191])
