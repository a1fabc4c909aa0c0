"""Decode attention op: from the qkv GEMV's fp16 output to the o GEMV's fp16 input, for one token.

qkv bias (Qwen2), Gemma's q/k RMSNorm, RoPE at the step's position (read from device memory, so a
captured CUDA graph serves every step), the new key and value written into the fp16 KV cache, then
attention of every query head over the positions <= position (and, on Gemma's sliding layers,
> position - sliding_window), softmax in float32. GQA: the n_heads / n_kv_heads query heads of a
kv head share its keys and values, so one block serves all of them.

`attend` is the model's math (models/arch.py calls it for every token count), `decode_attention_reference`
its one-token form on the fp16 cache, `DecodeAttention`
the kernel, split over the KV length as flash-decoding does (`_attention_kernel`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numba import cuda, float32, int32, uint32

from decdec.args import ModelArgs
from decdec.ops.norm import rms_norm
from decdec.ops.ptx import (fence_acq_rel, half2_floats, load_u32x4, pack_half2, pdl_supported, release_dependents,
                            wait_upstream)
from decdec.ops.reduce import SCRATCH, warp_max, warp_sum, words

THREADS = 128  # 4 warps a block
WARPS = THREADS // 32
TILE_HALVES = 4096  # a tile of keys (or values) is 8 KiB of fp16: 32 positions at head_dim 128 (short tiles
# spread a short context over more blocks: bench/attention_tiles.py)
MIN_TILE = 32  # positions: a shorter tile leaves a warp of the score step idle lanes
SPLITS = 64  # blocks per kv head at most (the combine gives each split one of a warp's 2 x 32 slots)
BLOCKS = 256  # blocks the plan aims at at long context: ~2 per SM, whatever the kv head count
HEAD_DIMS = (32, 64, 128, 256)  # powers of 2: a row is whole 16-byte vectors, their count a power of 2


@dataclass
class KVCache:
    """Keys and values of every layer, allocated once for `max_seq_len` positions."""

    k: torch.Tensor  # [n_layers, max_seq_len, KV, hd]
    v: torch.Tensor

    @classmethod
    def allocate(cls, args: ModelArgs, max_seq_len: int, device="cpu", dtype=torch.float32) -> "KVCache":
        shape = (args.n_layers, max_seq_len, args.n_kv_heads, args.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


def rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE (Hugging Face order) on x [T, heads, hd] at integer positions [T]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=x.device) / hd))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, hd/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention_mask(args: ModelArgs, layer: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Boolean [Tq, Tk]: causal, and inside the sliding window on Gemma 3's local layers."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if args.is_sliding(layer) and args.sliding_window:
        mask &= k_pos[None, :] > q_pos[:, None] - args.sliding_window
    return mask


def attention(args: ModelArgs, layer: int, q, k, v, q_pos, k_pos) -> torch.Tensor:
    """q [T, H, hd], k/v [S, KV, hd] -> [T, H*hd]."""
    group = args.n_heads // args.n_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = args.query_scale if args.query_scale is not None else args.head_dim**-0.5
    mask = attention_mask(args, layer, q_pos, k_pos)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )  # [H, T, hd]
    return out.transpose(0, 1).reshape(q.shape[0], -1)


def attend(args: ModelArgs, weights, layer: int, qkv: torch.Tensor, positions, cache: KVCache | None) -> torch.Tensor:
    """From the qkv projection [T, q+2kv] to the attention output [T, H*hd]: bias, Gemma's q/k norms,
    RoPE, the KV cache (written at `positions`, read up to the last one), and attention."""
    p = f"layers.{layer}."
    T = qkv.shape[0]
    if args.qkv_bias:
        qkv = qkv + weights[p + "qkv_bias"]
    q, k, v = qkv.split([args.q_dim, args.kv_dim, args.kv_dim], dim=-1)
    q = q.reshape(T, args.n_heads, args.head_dim)
    k = k.reshape(T, args.n_kv_heads, args.head_dim)
    v = v.reshape(T, args.n_kv_heads, args.head_dim)
    if args.is_gemma:
        q = rms_norm(q, weights[p + "q_norm"], args.norm_eps)
        k = rms_norm(k, weights[p + "k_norm"], args.norm_eps)
    base = args.rope_base_of(layer)
    q, k = rope(q, positions, base), rope(k, positions, base)
    k_pos = positions
    if cache is not None:
        end = int(positions[-1]) + 1
        cache.k[layer, positions] = k
        cache.v[layer, positions] = v
        k, v = cache.k[layer, :end], cache.v[layer, :end]
        k_pos = torch.arange(end, device=qkv.device)
    return attention(args, layer, q, k, v, positions, k_pos)


def decode_attention_reference(args: ModelArgs, weights: dict[str, torch.Tensor], layer: int, qkv: torch.Tensor,
                               position: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """fp16 [n_heads * head_dim] from qkv fp16 [q + 2 kv] at `position` (int64 [1]); the layer's key and
    value are written into the fp16 `cache` at `position` (rounded to fp16 after the float32 math)."""
    work = KVCache(cache.k.float(), cache.v.float())
    out = attend(args, weights, layer, qkv.float()[None], position.reshape(1), work)
    cache.k[layer, position] = work.k[layer, position].half()
    cache.v[layer, position] = work.v[layer, position].half()
    return out[0].half()


def rope_table(head_dim: int, base: float, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [max_seq_len, head_dim / 2] of models.arch.rope's angles, computed the same way."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(max_seq_len).to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


@dataclass(frozen=True)
class AttentionPlan:
    """How one layer shape is cut: a block per (kv head, split); a split takes every `splits`-th tile
    of `tile` positions between the window's start and the position."""

    n_kv_heads: int
    group: int  # query heads per kv head
    head_dim: int
    tile: int
    splits: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.n_kv_heads, self.splits


def plan_attention(args: ModelArgs, tile: int | None = None, splits: int | None = None) -> AttentionPlan:
    """The plan of `args`' layers: tiles of TILE_HALVES / head_dim positions (MIN_TILE to THREADS) unless
    `tile` is given; BLOCKS / n_kv_heads splits (32 to SPLITS) unless `splits` is: a model with one kv
    head (Gemma 3 270M) needs more splits than one with eight to fill the GPU at long context."""
    hd = args.head_dim
    tile = tile or min(THREADS, max(MIN_TILE, TILE_HALVES // max(hd, 1)))
    if hd not in HEAD_DIMS or args.n_heads % args.n_kv_heads:
        raise ValueError(f"head_dim = {hd}, {args.n_heads} heads on {args.n_kv_heads} kv heads: the attention "
                         f"kernel takes head_dim in {HEAD_DIMS} and whole query groups")
    splits = splits or min(SPLITS, max(32, BLOCKS // args.n_kv_heads))
    if THREADS % tile or tile * hd % (8 * THREADS) or not 1 <= splits <= SPLITS:
        raise ValueError(f"tile = {tile}, splits = {splits}: tile must divide {THREADS} and hold a multiple of "
                         f"{8 * THREADS} halves, splits in 1..{SPLITS}")
    return AttentionPlan(args.n_kv_heads, args.n_heads // args.n_kv_heads, hd, tile, splits)


@dataclass
class AttentionScratch:
    """The splits' partial results, shared by every layer of a plan (the layers run one after another):
    (max, sum) float32 [kv, splits, group, 2], acc float32 [kv, splits, group, head_dim], and one
    arrival counter per kv head (zero between launches: the last block resets it)."""

    ml: object
    acc: object
    counters: object

    @classmethod
    def allocate(cls, p: AttentionPlan) -> "AttentionScratch":
        n = p.n_kv_heads * p.splits * p.group
        return cls(cuda.device_array(2 * n, np.float32), cuda.device_array(n * p.head_dim, np.float32),
                   cuda.to_device(np.zeros(p.n_kv_heads, np.int32)))


def _copy_source(loads: int, vec: int, pitch: int) -> str:
    """Source of `copy`: a thread's `loads` 16-byte loads of keys and as many of values from one tile of
    the cache into the shared tiles kt / vt, written out so that every load is issued before the first
    store (NVVM unrolls the equivalent loop only by 2). Rows outside [r0, r1) load a valid row instead
    (branch-free; their slots are never read). vec (16-byte vectors per row) is a power of 2."""
    shift = vec.bit_length() - 1
    lines = ["def copy(kc, vc, kt, vt, t0, r0, r1, n_kv, hw, h, tid):"]
    for j in range(loads):
        lines += [f"    row{j} = (tid + {j * THREADS}) >> {shift}",
                  f"    col{j} = 4 * ((tid + {j * THREADS}) & {vec - 1})",
                  f"    src = ((t0 + min(max(row{j}, r0), r1 - 1)) * n_kv + h) * hw + col{j}",
                  f"    k{j} = load_u32x4(kc, src)",
                  f"    v{j} = load_u32x4(vc, src)"]
    for j in range(loads):
        lines.append(f"    dst = row{j} * {pitch} + col{j}")
        lines += [f"    {t}t[dst + {c}] = {t}{j}[{c}]" for c in range(4) for t in "kv"]
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def _make_copy(loads: int, vec: int, pitch: int):
    scope = {"load_u32x4": load_u32x4}
    exec(compile(_copy_source(loads, vec, pitch), f"<attention.copy loads={loads} vec={vec}>", "exec"), scope)
    return cuda.jit(device=True)(scope["copy"])


@functools.lru_cache(maxsize=None)
def _attention_kernel(group: int, hd: int, tile: int, splits: int):
    """The kernel for one (group, head_dim, tile, splits): sizes of shared arrays and loops are constants.

    Block (h, b), 128 threads: kv head h and its `group` query heads; split b takes tiles first + b,
    first + b + splits, ... up to the tile holding the position (first: the window's first tile). A
    block with no tile returns at once, so the cost grows with the position, not with max_seq.
    1. prologue: q, k, v of head h from qkv (+ bias), q/k RMSNorm, RoPE from the cos / sin tables at
       the position, 1 / sqrt(hd)-style scale folded into q; the block owning the position's tile
       writes k, v (fp16) into the cache there. The block's first tile of step 2 is copied before q, k,
       v are read: behind a programmatic edge (`wait_upstream`) that copy overlaps the qkv GEMV.
    2. per tile: keys and values are copied to shared memory (16-byte loads; pitch hd / 2 + 1 words so
       that a thread per position reads its row conflict-free), the position's own row replaced from
       the prologue; scores by a thread per (position, query head); online softmax by a warp per head;
       P V by a thread per (head, fp16 pair) into a float32 accumulator in shared memory.
    3. a kv head with one active split writes its output; otherwise each split writes (max, sum, acc)
       and the last to arrive (an int32 atomic counter per kv head) combines them: a lane per split
       (two splits a lane above 32) finds the weights, then a thread per (head, pair) sums the splits in order 0, 1, ...
    Bytes at Llama-3-8B shapes and position P: keys and values 4 KiB x (P + 1) per layer (all kv heads);
    per active block ~1.5 KiB of qkv read, ~2 KiB of partials written and read back; output 8 KiB.
    """
    hw = hd // 2  # fp16 pairs (uint32 words) of a head
    pitch = hw + 1
    vec = hd // 8  # 16-byte vectors of a row
    copy = _make_copy(tile * vec // THREADS, vec, pitch)
    qk = (group + 1) * hd  # the query heads, then the key
    hstep = THREADS // tile  # threads per position in the score step
    items = group * hw
    neg_inf = float32(-math.inf)
    PDL = pdl_supported()
    # shared sizes must be literal constants for Numba: each its own closure variable
    tile_words, q_size, v_size, r_size = tile * pitch, qk, hd, group + 1
    sc_size, acc_size, stat_size, coef_size = group * tile, group * hd, 3 * group, group * splits
    QKV_ITEMS = -(-(group + 2) * hw // THREADS)  # fp16 pairs of q, k, v a thread loads
    ROPE_ITEMS = -(-(group + 1) * hw // THREADS)  # rotated pairs of q and k a thread takes
    qv_size, rot_size = 2 * QKV_ITEMS, 4 * ROPE_ITEMS

    @cuda.jit
    def kernel(qkv, bias, has_bias, q_norm, k_norm, has_norm, eps, scale, position, cos, sin, kc, vc, out,
               part_ml, part_acc, counters, n_kv, window):
        kt = cuda.shared.array(tile_words, uint32)
        vt = cuda.shared.array(tile_words, uint32)
        qs = cuda.shared.array(q_size, float32)
        vs = cuda.shared.array(v_size, float32)
        rs = cuda.shared.array(r_size, float32)
        sc = cuda.shared.array(sc_size, float32)
        acc = cuda.shared.array(acc_size, float32)
        stat = cuda.shared.array(stat_size, float32)  # running max, running sum, last rescale
        coef = cuda.shared.array(coef_size, float32)
        flag = cuda.shared.array(1, int32)
        scratch = cuda.shared.array(SCRATCH, float32)
        h = cuda.blockIdx.x
        b = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        q_words = n_kv * group * hw
        # 1. prologue. A block's latency is a chain of memory round trips, so every global load is issued
        # before its first use. What no kernel of the step writes comes first, before `wait_upstream`
        # (behind a programmatic edge it overlaps the qkv GEMV): the position (written before the step),
        # the RoPE angles and norm weights, and the block's first tile of the cache (rows < position, of
        # earlier steps; the position's own row is replaced below). Then q, k, v of this step.
        pos = int32(position[0])
        lo = max(int32(0), pos - window + 1) if window > 0 else int32(0)
        first = lo // tile
        last = pos // tile
        n_active = min(splits, last - first + 1)
        if b >= n_active:
            return
        owner = (last - first) % splits == b
        rot = cuda.local.array(rot_size, float32)  # (cos, sin, norm weight of x1, of x2) per pair
        for j in range(ROPE_ITEMS):
            e = tid + j * THREADS
            if e < (group + 1) * hw:
                i = e % hw
                rot[4 * j] = cos[pos * hw + i]
                rot[4 * j + 1] = sin[pos * hw + i]
                if has_norm:
                    nw = q_norm if e < group * hw else k_norm
                    rot[4 * j + 2] = nw[i]
                    rot[4 * j + 3] = nw[i + hw]
        t_first = first + b
        copy(kc, vc, kt, vt, t_first * tile, max(lo - t_first * tile, 0), min(pos - t_first * tile + 1, tile), n_kv,
             hw, h, tid)
        if PDL:
            wait_upstream()
            release_dependents()
        qv = cuda.local.array(qv_size, float32)
        raw = cuda.local.array(QKV_ITEMS, uint32)
        for j in range(QKV_ITEMS):  # unconditional loads (index clamped): all issue before the first use, where
            e = min(tid + j * THREADS, (group + 2) * hw - 1)  # a load under a branch waits before the next issues
            if e < group * hw:
                src = h * group * hw + e
            elif e < (group + 1) * hw:
                src = q_words + h * hw + e - group * hw
            else:
                src = q_words + n_kv * hw + h * hw + e - (group + 1) * hw
            raw[j] = qkv[src]
            bi = 2 * src if has_bias else 0  # without a bias: its 1-element dummy
            qv[2 * j] = bias[bi]
            qv[2 * j + 1] = bias[bi + 1 if has_bias else 0]
        for j in range(QKV_ITEMS):
            v0, v1 = half2_floats(raw[j])
            qv[2 * j] = v0 + qv[2 * j] if has_bias else v0
            qv[2 * j + 1] = v1 + qv[2 * j + 1] if has_bias else v1
        for j in range(QKV_ITEMS):
            e = tid + j * THREADS
            if e < (group + 1) * hw:
                qs[2 * e] = qv[2 * j]
                qs[2 * e + 1] = qv[2 * j + 1]
            elif e < (group + 2) * hw:
                vs[2 * (e - (group + 1) * hw)] = qv[2 * j]
                vs[2 * (e - (group + 1) * hw) + 1] = qv[2 * j + 1]
        if tid < group:
            stat[tid] = neg_inf
            stat[group + tid] = 0
        for it in range(tid, items, THREADS):
            acc[2 * it] = 0
            acc[2 * it + 1] = 0
        cuda.syncthreads()
        if has_norm:
            for hh0 in range(0, group + 1, WARPS):  # every warp calls warp_sum alike (simulator)
                hh = hh0 + warp
                ss = float32(0)
                if hh <= group:
                    for d in range(lane, hd, 32):
                        ss += qs[hh * hd + d] * qs[hh * hd + d]
                ss = warp_sum(ss, scratch)
                if lane == 0 and hh <= group:
                    rs[hh] = float32(1) / math.sqrt(ss / hd + eps)
            cuda.syncthreads()
        for j in range(ROPE_ITEMS):
            e = tid + j * THREADS
            if e < (group + 1) * hw:
                hh = e // hw
                i = e % hw
                x1 = qs[hh * hd + i]
                x2 = qs[hh * hd + i + hw]
                if has_norm:
                    r = rs[hh]
                    x1 = x1 * r * rot[4 * j + 2]
                    x2 = x2 * r * rot[4 * j + 3]
                c = rot[4 * j]
                s = rot[4 * j + 1]
                y1 = x1 * c - x2 * s
                y2 = x2 * c + x1 * s
                if hh < group:
                    y1 *= scale
                    y2 *= scale
                qs[hh * hd + i] = y1
                qs[hh * hd + i + hw] = y2
        cuda.syncthreads()
        row_words = (pos * n_kv + h) * hw
        if owner:
            for w in range(tid, hw, THREADS):
                kc[row_words + w] = pack_half2(qs[group * hd + 2 * w], qs[group * hd + 2 * w + 1])
                vc[row_words + w] = pack_half2(vs[2 * w], vs[2 * w + 1])
        # 2. tiles (the first one was copied in the prologue)
        t = t_first
        while t <= last:
            t0 = t * tile
            r0 = max(lo - t0, 0)
            r1 = min(pos - t0 + 1, tile)
            if t > t_first:
                cuda.syncthreads()  # the previous tile is consumed
                copy(kc, vc, kt, vt, t0, r0, r1, n_kv, hw, h, tid)
            if t == last:  # the position's row: this block wrote it, the read-only loads may not see it
                cuda.syncthreads()
                for w in range(tid, hw, THREADS):
                    kt[(pos - t0) * pitch + w] = pack_half2(qs[group * hd + 2 * w], qs[group * hd + 2 * w + 1])
                    vt[(pos - t0) * pitch + w] = pack_half2(vs[2 * w], vs[2 * w + 1])
            cuda.syncthreads()
            row = tid % tile
            for g in range(tid // tile, group, hstep):
                s = neg_inf
                if r0 <= row < r1:
                    s = float32(0)
                    for w in range(hw):
                        k0, k1 = half2_floats(kt[row * pitch + w])
                        s += qs[g * hd + 2 * w] * k0 + qs[g * hd + 2 * w + 1] * k1
                sc[g * tile + row] = s
            cuda.syncthreads()
            for g0 in range(0, group, WARPS):  # a warp per head; every warp calls the reductions alike
                g = g0 + warp
                m = neg_inf
                if g < group:
                    for r in range(lane, tile, 32):
                        m = max(m, sc[g * tile + r])
                m = warp_max(m, scratch)
                l = float32(0)
                m_old = neg_inf
                if g < group:
                    m_old = stat[g]
                    m = max(m, m_old)
                    for r in range(lane, tile, 32):
                        p = math.exp(sc[g * tile + r] - m)
                        sc[g * tile + r] = p
                        l += p
                l = warp_sum(l, scratch)
                if g < group and lane == 0:
                    alpha = math.exp(m_old - m)
                    stat[g] = m
                    stat[group + g] = stat[group + g] * alpha + l
                    stat[2 * group + g] = alpha
            cuda.syncthreads()
            for it in range(tid, items, THREADS):
                g = it // hw
                w = it % hw
                alpha = stat[2 * group + g]
                a0 = acc[2 * it] * alpha
                a1 = acc[2 * it + 1] * alpha
                for r in range(r0, r1):
                    p = sc[g * tile + r]
                    v0, v1 = half2_floats(vt[r * pitch + w])
                    a0 += p * v0
                    a1 += p * v1
                acc[2 * it] = a0
                acc[2 * it + 1] = a1
            t += splits
        cuda.syncthreads()
        # 3. output, or partials and the combine (acc item it = (g, w) is head g's pair w)
        out_base = h * group * hw
        if n_active == 1:
            for it in range(tid, items, THREADS):
                inv = float32(1) / stat[group + it // hw]
                out[out_base + it] = pack_half2(acc[2 * it] * inv, acc[2 * it + 1] * inv)
            return
        part = (h * splits + b) * group
        for it in range(tid, items, THREADS):
            part_acc[part * hd + 2 * it] = acc[2 * it]
            part_acc[part * hd + 2 * it + 1] = acc[2 * it + 1]
        if tid < group:
            part_ml[2 * (part + tid)] = stat[tid]
            part_ml[2 * (part + tid) + 1] = stat[group + tid]
        cuda.syncthreads()
        if tid == 0:  # release: the block's partials (ordered before the count by the barrier)
            fence_acq_rel()
            old = cuda.atomic.add(counters, h, 1)
            flag[0] = 1 if old == n_active - 1 else 0
            if old == n_active - 1:
                fence_acq_rel()  # acquire: the other splits' partials before this block reads them
                counters[h] = 0  # every split has arrived: nobody else touches it this launch
        cuda.syncthreads()
        if flag[0] == 0:
            return
        for g0 in range(0, group, WARPS):  # a warp per head, a lane per split (two above 32 splits)
            g = g0 + warp
            l0 = l1 = float32(0)
            m0 = m1 = neg_inf
            if g < group:
                if lane < n_active:
                    m0 = part_ml[2 * ((h * splits + lane) * group + g)]
                    l0 = part_ml[2 * ((h * splits + lane) * group + g) + 1]
                if lane + 32 < n_active:
                    m1 = part_ml[2 * ((h * splits + lane + 32) * group + g)]
                    l1 = part_ml[2 * ((h * splits + lane + 32) * group + g) + 1]
            m_all = warp_max(max(m0, m1), scratch)
            e0 = math.exp(m0 - m_all) if m0 > neg_inf else float32(0)
            e1 = math.exp(m1 - m_all) if m1 > neg_inf else float32(0)
            total = warp_sum(e0 * l0 + e1 * l1, scratch)
            if g < group and lane < n_active:
                coef[g * splits + lane] = e0 / total
            if g < group and lane + 32 < n_active:
                coef[g * splits + lane + 32] = e1 / total
        cuda.syncthreads()
        for it in range(tid, items, THREADS):
            g = it // hw
            o0 = float32(0)
            o1 = float32(0)
            for s in range(n_active):
                c = coef[g * splits + s]
                src = ((h * splits + s) * group + g) * hd + 2 * (it % hw)
                o0 += c * part_acc[src]
                o1 += c * part_acc[src + 1]
            out[out_base + it] = pack_half2(o0, o1)

    return kernel


def _dummy() -> object:
    return cuda.device_array(1, np.float32)


class DecodeAttention:
    """A prepared attention launch of one layer; call it per step.

    Device arrays (Numba views of torch buffers, made once): qkv fp16 [q + 2 kv], position int64 [1],
    k_cache / v_cache fp16 [n_layers, max_seq, n_kv, head_dim] (the model's), out fp16 [n_heads * head_dim],
    rope = (cos, sin) float32 [max_seq, head_dim / 2] of this layer's base (`rope_table`), and where
    the family has them bias float32 [q + 2 kv], q_norm / k_norm float32 [head_dim]. The launch is
    fixed; the position is read on the device.
    """

    def __init__(self, args: ModelArgs, layer: int, plan: AttentionPlan, scratch: AttentionScratch, qkv, position,
                 k_cache, v_cache, out, rope, bias=None, q_norm=None, k_norm=None):
        scale = args.query_scale if args.query_scale is not None else args.head_dim ** -0.5
        window = args.sliding_window if args.is_sliding(layer) and args.sliding_window else 0
        dummy = _dummy() if bias is None or q_norm is None else None
        cos, sin = (a.reshape(a.size) for a in rope)
        self.plan = plan
        self.kernel = _attention_kernel(plan.group, plan.head_dim, plan.tile, plan.splits)
        self.args = (words(qkv), bias if bias is not None else dummy, bias is not None,
                     q_norm if q_norm is not None else dummy, k_norm if k_norm is not None else dummy,
                     q_norm is not None, np.float32(args.norm_eps), np.float32(scale), position, cos, sin,
                     words(k_cache[layer]), words(v_cache[layer]), words(out), scratch.ml, scratch.acc,
                     scratch.counters, plan.n_kv_heads, window)

    def __call__(self, stream=0) -> None:
        self.kernel[self.plan.grid, THREADS, stream](*self.args)
