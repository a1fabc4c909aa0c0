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
from decdec.ops.ptx import (fence_acq_rel, half2_floats, load_f32x4, load_u32x4, pack_half2, pdl_supported,
                            release_dependents, wait_upstream)
from decdec.ops.reduce import SCRATCH, lanes_sum, warp_max, warp_sum, words

THREADS = 128  # 4 warps a block
WARPS = THREADS // 32
VEC = 8  # halves of a row a lane holds: one 16-byte load
ROWS_IN_FLIGHT = 4  # rows a lane loads per tile (keys and values) by default: the loads of one round trip
MAX_ROWS_IN_FLIGHT = 8  # the most a plan may ask; at 8 (Llama's tile 64) ptxas keeps the two tiles on the stack
SPLITS = 64  # blocks per kv head at most by default
MAX_SPLITS = 256  # the most a plan may ask: the combine's lanes weigh 8 splits each
BLOCKS = 256  # blocks the plan aims at at long context: ~2 per SM, whatever the kv head count
COMBINE_LOADS = 16  # splits whose partials (4 floats, one 16-byte load each) a thread of the combine loads at once
HEAD_DIMS = (32, 64, 128, 256)  # powers of 2 from 4 to 32 lanes a row


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


def rows_at_once(head_dim: int) -> int:
    """Rows of the cache a block holds at once: a row is head_dim / VEC lanes."""
    return THREADS * VEC // head_dim


def plan_attention(args: ModelArgs, tile: int | None = None, splits: int | None = None) -> AttentionPlan:
    """The plan of `args`' layers: tiles of ROWS_IN_FLIGHT rows per lane unless `tile` is given;
    BLOCKS / n_kv_heads splits (32 to SPLITS) unless `splits` is: a model with one kv head (Gemma 3
    270M) needs more splits than one with eight to fill the GPU at long context."""
    hd = args.head_dim
    if hd not in HEAD_DIMS or args.n_heads % args.n_kv_heads:
        raise ValueError(f"head_dim = {hd}, {args.n_heads} heads on {args.n_kv_heads} kv heads: the attention "
                         f"kernel takes head_dim in {HEAD_DIMS} and whole query groups")
    rows = rows_at_once(hd)
    tile = tile or rows * ROWS_IN_FLIGHT
    splits = splits or min(SPLITS, max(32, BLOCKS // args.n_kv_heads))
    if tile % rows or not 1 <= tile // rows <= MAX_ROWS_IN_FLIGHT or not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"tile = {tile}, splits = {splits}: at head_dim {hd} a tile is 1 to {MAX_ROWS_IN_FLIGHT} "
                         f"times {rows} positions, splits in 1..{MAX_SPLITS}")
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


@functools.lru_cache(maxsize=None)
def _attention_kernel(group: int, hd: int, tile: int, splits: int):
    """The kernel for one (group, head_dim, tile, splits): sizes of local and shared arrays are constants.

    Block (h, b), 128 threads: kv head h and its `group` query heads; split b takes tiles first + b,
    first + b + splits, ... up to the tile holding the position (first: the window's first tile). A
    block with no tile returns at once, so the cost grows with the position, not with max_seq.
    A row of the cache (head_dim fp16) is held by `hd / 8` lanes, 8 halves (one 16-byte load) each; a
    warp holds 256 / hd rows at once, the block `rows` = 4 x that (a "slot" each), and a tile is
    `tile / rows` rows per slot, all loaded before the first is used.
    1. prologue: the block's first tile of keys and values is loaded into registers before
       `wait_upstream` (rows < position, of earlier steps: behind a programmatic edge the loads overlap
       the qkv GEMV). Then q, k, v of head h from qkv (+ bias), q/k RMSNorm, RoPE from the cos / sin
       tables at the position, 1 / sqrt(hd)-style scale folded into q; the block owning the position's
       tile writes k, v (fp16) into the cache there. Each lane keeps its 8 dims of every query head.
    2. per tile: the next tile's loads are issued, then each slot scores its rows (8-dim partial dot
       products summed over the row's lanes by shuffles; the position's own row taken from the
       prologue), and updates its own online softmax (max, sum, accumulator of its 8 dims per head) in
       registers: no barrier inside the loop.
    3. the slots' states meet in shared memory (one barrier); a kv head with one active split writes
       its output, otherwise each split writes (max, sum, acc) and the last to arrive (an int32 atomic
       counter per kv head) combines them: a lane per split (up to 8 per lane) finds the weights, then a
       thread per (head, 4 dims) sums the splits, COMBINE_LOADS 16-byte loads of them at once.
    Bytes at Llama-3-8B shapes and position P: keys and values 4 KiB x (P + 1) per layer (all kv heads);
    per active block ~1.5 KiB of qkv read, ~2 KiB of partials written and read back; output 8 KiB.
    """
    hw = hd // 2  # fp16 pairs (uint32 words) of a head
    lanes = hd // VEC  # lanes holding one row
    rows_warp = 32 // lanes
    rows = WARPS * rows_warp  # slots of the block
    nj = tile // rows  # rows per slot per tile
    qk = (group + 1) * hd  # the query heads, then the key
    items = group * hw
    neg_inf = float32(-math.inf)
    inv_hd = float32(1 / hd)
    PDL = pdl_supported()
    # shared and local sizes must be literal constants for Numba: each its own closure variable
    q_size, v_size, r_size, stat_size, coef_size = qk, hd, group + 1, 2 * group, group * splits
    split_lanes = -(-splits // 32)  # splits a lane of the combine weighs
    quads = hd // 4
    acc_size, slot_size, slot_acc_size = group * hd, rows * group, rows * group * hd
    tile_regs, q_regs, sc_regs = 4 * nj, group * VEC, group * nj
    QKV_ITEMS = -(-(group + 2) * hw // THREADS)  # fp16 pairs of q, k, v a thread loads
    ROPE_ITEMS = -(-(group + 1) * hw // THREADS)  # rotated pairs of q and k a thread takes
    qv_size, rot_size = 2 * QKV_ITEMS, 4 * ROPE_ITEMS

    @cuda.jit(device=True, inline="always")
    def load_tile(kc, vc, kr, vr, t, lo, pos, n_kv, h, slot, col):
        """Keys and values of tile t's rows of this lane's slot (rows outside [lo, pos] load a valid one:
        branch-free; their scores are masked)."""
        for j in range(nj):
            src = ((min(max(t * tile + j * rows + slot, lo), pos) * n_kv + h) * hw + col)
            kr[4 * j], kr[4 * j + 1], kr[4 * j + 2], kr[4 * j + 3] = load_u32x4(kc, src)
            vr[4 * j], vr[4 * j + 1], vr[4 * j + 2], vr[4 * j + 3] = load_u32x4(vc, src)

    @cuda.jit
    def kernel(qkv, bias, has_bias, q_norm, k_norm, has_norm, eps, scale, position, cos, sin, kc, vc, out,
               part_ml, part_acc, counters, n_kv, window):
        qs = cuda.shared.array(q_size, float32)
        vs = cuda.shared.array(v_size, float32)
        rs = cuda.shared.array(r_size, float32)
        acc = cuda.shared.array(acc_size, float32)
        stat = cuda.shared.array(stat_size, float32)  # the block's max and sum per head
        coef = cuda.shared.array(coef_size, float32)
        slot_m = cuda.shared.array(slot_size, float32)
        slot_l = cuda.shared.array(slot_size, float32)  # the slot's sum, then its weight in the block
        slot_acc = cuda.shared.array(slot_acc_size, float32)
        flag = cuda.shared.array(1, int32)
        scratch = cuda.shared.array(SCRATCH, float32)
        h = cuda.blockIdx.x
        b = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        slot = warp * rows_warp + lane // lanes
        col = 4 * (lane % lanes)  # the lane's first word of a row
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
        kr = cuda.local.array(tile_regs, uint32)
        vr = cuda.local.array(tile_regs, uint32)
        t = first + b
        load_tile(kc, vc, kr, vr, t, lo, pos, n_kv, h, slot, col)
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
                    rs[hh] = float32(1) / math.sqrt(ss * inv_hd + eps)  # float32: ss / hd would be float64
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
        if owner:
            row_words = (pos * n_kv + h) * hw
            for w in range(tid, hw, THREADS):
                kc[row_words + w] = pack_half2(qs[group * hd + 2 * w], qs[group * hd + 2 * w + 1])
                vc[row_words + w] = pack_half2(vs[2 * w], vs[2 * w + 1])
        # the lane's dims of the query heads, and of the position's own key and value (fp16, as cached)
        q = cuda.local.array(q_regs, float32)
        own_k = cuda.local.array(4, uint32)
        own_v = cuda.local.array(4, uint32)
        for d in range(VEC):
            for g in range(group):
                q[g * VEC + d] = qs[g * hd + 2 * col + d]
        for c in range(4):
            own_k[c] = pack_half2(qs[group * hd + 2 * (col + c)], qs[group * hd + 2 * (col + c) + 1])
            own_v[c] = pack_half2(vs[2 * (col + c)], vs[2 * (col + c) + 1])
        # 2. tiles: an online softmax per slot, in registers
        m = cuda.local.array(group, float32)
        l = cuda.local.array(group, float32)
        o = cuda.local.array(q_regs, float32)
        for g in range(group):
            m[g] = neg_inf
            l[g] = 0
        for i in range(q_regs):
            o[i] = 0
        kn = cuda.local.array(tile_regs, uint32)
        vn = cuda.local.array(tile_regs, uint32)
        sc = cuda.local.array(sc_regs, float32)
        while t <= last:
            if t + splits <= last:  # the next tile's loads fly while this one is scored
                load_tile(kc, vc, kn, vn, t + splits, lo, pos, n_kv, h, slot, col)
            for j in range(nj):
                p = t * tile + j * rows + slot
                mine = p == pos
                for g in range(group):
                    sc[g * nj + j] = 0
                for c in range(4):
                    k0, k1 = half2_floats(own_k[c] if mine else kr[4 * j + c])
                    for g in range(group):
                        sc[g * nj + j] += q[g * VEC + 2 * c] * k0 + q[g * VEC + 2 * c + 1] * k1
                for g in range(group):
                    s = lanes_sum(sc[g * nj + j], lanes, scratch)
                    sc[g * nj + j] = s if lo <= p <= pos else neg_inf
            for g in range(group):
                m_new = m[g]
                for j in range(nj):
                    m_new = max(m_new, sc[g * nj + j])
                alpha = math.exp(m[g] - m_new) if m_new > neg_inf else float32(1)
                m[g] = m_new
                l[g] *= alpha
                for d in range(VEC):
                    o[g * VEC + d] *= alpha
                for j in range(nj):
                    e = math.exp(sc[g * nj + j] - m_new) if sc[g * nj + j] > neg_inf else float32(0)
                    sc[g * nj + j] = e
                    l[g] += e
            for j in range(nj):
                mine = t * tile + j * rows + slot == pos
                for c in range(4):
                    v0, v1 = half2_floats(own_v[c] if mine else vr[4 * j + c])
                    for g in range(group):
                        o[g * VEC + 2 * c] += sc[g * nj + j] * v0
                        o[g * VEC + 2 * c + 1] += sc[g * nj + j] * v1
            for i in range(tile_regs):
                kr[i] = kn[i]
                vr[i] = vn[i]
            t += splits
        # 3. the slots meet: the block's (max, sum) per head in stat, its accumulator in acc
        for g in range(group):
            for d in range(VEC):
                slot_acc[(slot * group + g) * hd + 2 * col + d] = o[g * VEC + d]
            if lane % lanes == 0:
                slot_m[slot * group + g] = m[g]
                slot_l[slot * group + g] = l[g]
        cuda.syncthreads()
        if tid < group:
            m_blk = neg_inf
            for s in range(rows):
                m_blk = max(m_blk, slot_m[s * group + tid])
            l_blk = float32(0)
            for s in range(rows):
                ms = slot_m[s * group + tid]
                w = math.exp(ms - m_blk) if ms > neg_inf else float32(0)
                l_blk += w * slot_l[s * group + tid]
                slot_l[s * group + tid] = w
            stat[tid] = m_blk
            stat[group + tid] = l_blk
        cuda.syncthreads()
        for i in range(tid, group * hd, THREADS):
            g = i // hd
            a = float32(0)
            for s in range(rows):
                a += slot_l[s * group + g] * slot_acc[(s * group + g) * hd + i % hd]
            acc[i] = a
        cuda.syncthreads()
        # the output, or partials and the combine (acc item it = (g, w) is head g's pair w)
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
        sm = cuda.local.array(split_lanes, float32)  # a lane's splits: max, then weight
        sl = cuda.local.array(split_lanes, float32)  # ... and sum
        for g0 in range(0, group, WARPS):  # a warp per head, a lane per split (up to 8 each)
            g = min(g0 + warp, group - 1)  # a warp past the last head repeats it and writes nothing
            m_lane = neg_inf
            for u in range(split_lanes):  # loads unconditional (index clamped): all issue before the first use
                s = min(lane + 32 * u, n_active - 1)
                sm[u] = part_ml[2 * ((h * splits + s) * group + g)]
                sl[u] = part_ml[2 * ((h * splits + s) * group + g) + 1]
                if lane + 32 * u >= n_active:
                    sm[u] = neg_inf
                m_lane = max(m_lane, sm[u])
            m_all = warp_max(m_lane, scratch)
            t_lane = float32(0)
            for u in range(split_lanes):
                sm[u] = math.exp(sm[u] - m_all) if sm[u] > neg_inf else float32(0)
                t_lane += sm[u] * sl[u]
            total = warp_sum(t_lane, scratch)
            for u in range(split_lanes):
                if g0 + warp < group and lane + 32 * u < n_active:
                    coef[g * splits + lane + 32 * u] = sm[u] / total
        cuda.syncthreads()
        for it in range(tid, group * quads, THREADS):  # a thread per (head, 4 dims): item it is head g's quad
            g = it // quads
            src0 = (h * splits * group + g) * hd + 4 * (it % quads)
            o0 = o1 = o2 = o3 = float32(0)
            for s0 in range(0, n_active, COMBINE_LOADS):
                for u in range(COMBINE_LOADS):  # unrolled: the loads of COMBINE_LOADS splits issue together
                    s = min(s0 + u, n_active - 1)
                    c = coef[g * splits + s] if s0 + u < n_active else float32(0)
                    a0, a1, a2, a3 = load_f32x4(part_acc, src0 + s * group * hd)
                    o0 += c * a0
                    o1 += c * a1
                    o2 += c * a2
                    o3 += c * a3
            out[out_base + 2 * it] = pack_half2(o0, o1)
            out[out_base + 2 * it + 1] = pack_half2(o2, o3)

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
