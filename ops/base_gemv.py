"""Base GEMV op: y = deq(Q) @ (x * act_scale) for one token, 3- or 4-bit weights in groups of 128
(docs/FORMATS.md).

`base_gemv_reference` is the obviously-correct CPU version (torch, float32). `BaseGemv` is the Numba CUDA
kernel for batch 1 (`_mma_kernel`): fp16 activations in, fp16 out, float32 accumulation on tensor cores.
Codes become fp16 operands of mma.m16n8k16 with about one LOP3 per pair of codes, read from a
tiled copy of the weights (`mma_layout`); see the section comment above `_mma_step_source`.

A batch-1 GEMV must stream the packed weights at HBM speed, and plain Numba is bound by instructions long
before that, so the kernel
- stages x * act_scale once per block in shared memory, as fp16 pairs in the order the mma fragments read;
- lets a block stream several row tiles (`tiles_per_block`) as one sequence of (tile, group) steps, the
  next step's weights in flight while this one is computed;
- is specialised on the group count and the row tiling, so weight offsets are immediates (the step is
  generated unrolled: `_mma_step_source`);
- splits K over the warps of a block (`k_warps`: short shapes, no arrival) or over blocks (grid.y: too
  few rows to fill the GPU, or more inputs than the shared staging holds). K blocks are summed without
  float atomics: each writes its float32 partial row sums, and the last block to arrive at a merge tile
  (an int32 atomic counter per tile) adds the parts in a fixed order and writes fp16. The same arrival
  merges the DecDEC correction (`ops.correction`), which runs concurrently on another stream and is
  simply one more part;
- folds in the glue around it where the plan asks (`PROLOGUES`, scheduler/plan.py): its staging makes
  the input from the RMSNorm's float32 input (1 / rms applied to its rows at the end) or from gate_up
  (act x up), and its rows add the residual stream as they are written (float32 out).
"""

from __future__ import annotations

import copy
import functools
import math
import inspect
import linecache
from dataclasses import dataclass

import numpy as np
import torch
from numba import cuda, float32, int32, uint32, uint64

from decdec.ops.act import act_value
from decdec.ops.layout import dequantize, unpack_codes  # noqa: F401 - re-exported: the reference's decoding
from decdec.ops.layout import words_to_int32
from decdec.ops.ptx import (MMA_SWAP, fence_acq_rel, half2_floats, load_u32x2, load_u32x4, mma_f16, pack_half2,
                            pdl_supported, release_dependents, wait_upstream)
from decdec.ops.reduce import SCRATCH, lanes8_max, lanes8_sum, warp_sum

SIMULATED = cuda.jit.__module__.startswith("numba.cuda.simulator")  # the CUDA simulator runs these kernels

WARPS = 8  # warps per block
THREADS = 32 * WARPS
STAGE_INPUTS = 4096  # inputs of x * act_scale one block stages in shared memory (10 KiB as padded fp16 pairs)
FLAG_CAP = 256  # tiles one arrival round decides at once (<= threads of any kernel that arrives)
MERGE_ROWS = 64  # rows of a merge tile: K parts and the correction arrive per merge tile (a GEMV tile of
# 128 or 256 rows arrives on 2 or 4), so the correction keeps blocks of 64 rows next to any GEMV plan
MMA_ROWS = 16  # rows of one mma tile
MMA_GROUP = 128  # inputs of one step: one quantization group (the only group size decdec/config.py allows)
MMA_PITCH = 20  # uint32 per (group, t) in the staged inputs: 16 pairs + 4 pad
MMA_MAGIC = 0x64006400  # fp16x2 (1024, 1024): codes are or-ed into its mantissas
MMA_MIN_BLOCKS = 3  # blocks per SM asked of ptxas
MMA_STAGE_GROUPS = STAGE_INPUTS // MMA_GROUP
K_WARPS = (1, 2, 4, 8)  # warps of a block that may split its K range (`GemvPlan.k_warps`)
_MASK_LO, _MASK_HI = 0x000F000F, 0x00F000F0  # 4-bit pairs (j, j + 4), j even / odd (x 16)
_FIELD_3BIT = 0x00070007  # 3-bit: a pair's codes at bits 0..2 of each half (x 8, x 64 one and two fields up)
_SPARE_SLOT = 15  # 3-bit: the slot whose codes sit one bit in each of a lane-row's 3 words (bit 9 of a half)
MMA_GROUP_WORDS = {4: 256, 3: 192}  # uint32 per (16-row block, group) in `mma_layout`
PROLOGUES = ("fp16", "rms_norm", "silu", "gelu_tanh")  # what the staging computes from the kernel's input x
# (`_mma_kernel`): the plain fp16 input, or the glue op before the GEMV folded into it
ACT_PROLOGUES = ("silu", "gelu_tanh")  # act x up: x is gate_up, both halves


# ----------------------------------------------------------------------------------------------------
# CPU reference


def base_gemv_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        act_scale: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """(x * act_scale) @ deq(Q)^T in float32 on the CPU; x [..., in] -> [..., out]."""
    act_scale = torch.as_tensor(act_scale, dtype=torch.float32)
    w = dequantize(torch.as_tensor(qweight), torch.as_tensor(scales), torch.as_tensor(zeros), bits,
                   act_scale.shape[-1], group_size)
    return (x.to(torch.float32) * act_scale) @ w.T


# ----------------------------------------------------------------------------------------------------
# helpers shared by the kernels of ops/ (the correction kernel imports these)

if SIMULATED:
    def int_as_float(bits):
        """The float32 whose bit pattern is `bits` (the simulator's stand-in for libdevice)."""
        return np.array(bits).astype(np.uint32).view(np.float32)[()]

    def float_as_int(v):
        """The bit pattern of the float32 `v` as int32 (the simulator's stand-in for libdevice)."""
        return np.array(v, np.float32).view(np.int32)[()]
else:
    from numba.cuda import libdevice

    int_as_float = libdevice.int_as_float
    float_as_int = libdevice.float_as_int


def jit_with_bounds(max_threads: int, min_blocks: int):
    """`cuda.jit` with launch bounds (max_threads, min_blocks) where this Numba takes them (numba-cuda
    does; the simulator and Numba's built-in CUDA target do not)."""
    if "launch_bounds" in inspect.signature(cuda.jit).parameters:
        return cuda.jit(launch_bounds=(max_threads, min_blocks))
    return cuda.jit


@cuda.jit(device=True)
def arrive_tiles(partials, counters, out, n_out, n_parts, tile_rows, first_tile, n_tiles, flags, resid, has_resid):
    """Count this block's part in at row tiles [first_tile, first_tile + n_tiles); finish full tiles.

    Every thread of the block calls it after writing its float32 partial rows to `partials` (flat,
    [n_parts * n_out]). For each tile one int32 atomic counts the arrivals; the block that brings the
    count to n_parts sums the parts in order 0..n_parts-1 (deterministic whoever arrives last), writes
    `out` (plus `resid`'s row when `has_resid`: a residual add folded into the GEMV) and resets the
    counter to 0 for the next step. Nothing waits, so the kernels that share a tile
    may run in any order or concurrently. Fences (`ptx.fence_acq_rel`) only in the threads that count:
    release before the count (the block's rows, ordered before it by the barrier), acquire after the
    count that completes a tile (the other parts' rows, ordered before the block's reads by the next
    barrier).
    """
    tid = cuda.threadIdx.x
    nthr = cuda.blockDim.x
    cuda.syncthreads()
    for base in range(0, n_tiles, FLAG_CAP):
        n_here = min(FLAG_CAP, n_tiles - base)
        for t in range(tid, n_here, nthr):
            tile = first_tile + base + t
            fence_acq_rel()
            old = cuda.atomic.add(counters, tile, 1)
            flags[t] = 1 if old == n_parts - 1 else 0
            if old == n_parts - 1:
                fence_acq_rel()
                counters[tile] = 0  # every part has arrived: nobody else touches it this step
        cuda.syncthreads()
        for e in range(tid, n_here * tile_rows, nthr):
            t = e // tile_rows
            row = (first_tile + base + t) * tile_rows + e % tile_rows
            if flags[t] != 0 and row < n_out:
                s = float32(0)
                for p in range(n_parts):
                    s += partials[p * n_out + row]
                out[row] = s + resid[row] if has_resid else s
        cuda.syncthreads()  # flags are reused by the next round


@cuda.jit(device=True)
def write_row(out, partials, n_out, kb, row, v, direct, resid, has_resid):
    """Row `row`'s value: the output (`direct`; plus `resid`'s row when `has_resid`) or K block kb's
    float32 part of the split output."""
    if direct:
        out[row] = v + resid[row] if has_resid else v
    else:
        partials[kb * n_out + row] = v


@cuda.jit(device=True)
def arrive_gemv_tile(partials, counters, out, n_out, n_parts, tile_rows, tile, flags, resid, has_resid):
    """`arrive_tiles` for GEMV row tile `tile` of `tile_rows` rows: on its merge tiles of
    min(tile_rows, MERGE_ROWS) rows (`GemvPlan.merge_rows`) that hold rows."""
    merge = min(tile_rows, MERGE_ROWS)
    first = tile * (tile_rows // merge)
    arrive_tiles(partials, counters, out, n_out, n_parts, merge, first,
                 min(tile_rows // merge, (n_out + merge - 1) // merge - first), flags, resid, has_resid)


# ----------------------------------------------------------------------------------------------------
# launch plan and the split-output scratch


def check_prologue_input(x, prologue: str, in_features: int) -> None:
    """x is what `prologue` reads for `in_features` inputs (gate_up: both halves); ValueError if not."""
    width = in_features * (2 if prologue in ACT_PROLOGUES else 1)
    if x.shape[0] != width:
        raise ValueError(f"x has {x.shape[0]} elements; the {prologue} prologue of {in_features} inputs reads {width}")


def _check_group(group_size: int) -> None:
    if group_size != MMA_GROUP:
        raise ValueError(f"group_size = {group_size}: the GEMV kernel takes weights in groups of {MMA_GROUP} "
                         "(the only group size decdec/config.py allows)")


@dataclass(frozen=True)
class GemvPlan:
    """How one weight shape is cut: 16-row mma tiles, `rows_per_warp` rows per warp, tiles of
    `tile_rows` rows, K in `k_blocks` blocks of `groups_per_kblock` groups, and each block taking
    `tiles_per_block` tiles (grid.x = ceil(n_tiles / tiles_per_block))."""

    bits: int
    out_features: int
    in_features: int
    rows_per_warp: int  # 16 per mma tile
    k_blocks: int
    groups_per_kblock: int  # 128-input groups per K block
    tiles_per_block: int = 1  # > 1: a block stages its inputs once and streams several tiles
    k_warps: int = 1  # warps of a block that split its K range (and share its rows), summed in shared
    # memory at the tile's end; > 1 gives short-K and few-row shapes shorter blocks
    early_load: bool = False  # the first weights are loaded before the inputs are staged

    @property
    def row_warps(self) -> int:
        return WARPS // self.k_warps

    @property
    def steps_per_tile(self) -> int:
        """Steps (groups) one warp takes per row tile."""
        return -(-self.groups_per_kblock // self.k_warps)

    @property
    def tile_rows(self) -> int:
        return self.row_warps * self.rows_per_warp

    @property
    def n_tiles(self) -> int:
        return -(-self.out_features // self.tile_rows)

    @property
    def merge_rows(self) -> int:
        """Rows of the split output's merge tiles (`SplitOutput.tile_rows`; a correction's `tile_rows`)."""
        return min(self.tile_rows, MERGE_ROWS)

    @property
    def grid(self) -> tuple[int, int]:
        return (-(-self.n_tiles // self.tiles_per_block), self.k_blocks)

    @property
    def weight_bytes(self) -> int:
        return self.out_features * self.in_features * self.bits // 8


def plan_gemv(out_features: int, in_features: int, bits: int, group_size: int = 128, n_sm: int = 132,
              rows_per_warp: int | None = None, k_blocks: int | None = None, persistent: bool = True,
              k_warps: int | None = None, early_load: bool | None = None) -> GemvPlan:
    """Pick the K split and the rows per warp by a small cost model, `_plan_cost`.

    Blocks run in waves of n_sm x MMA_MIN_BLOCKS. A block stages its K range's inputs once and,
    `persistent`, takes ceil(tiles x K blocks / slots) row tiles; otherwise one tile. Splitting K
    shortens tiles but adds epilogues. Each K block stages at most STAGE_INPUTS inputs.
    `k_warps` defaults to 8 (all of K in one block: no arrival) where one block stages all of K and
    16-row tiles make at most 2 blocks per SM, with 32-row tiles once 16-row ones exceed one block per
    SM; else 1, with 16 or 32 rows per warp by the cost model. (On larger shapes each of 3+ blocks per
    SM staging all of K costs more than the K blocks' arrival.) `early_load` defaults to k_warps > 1.
    """
    _check_group(group_size)
    if bits not in (3, 4):
        raise ValueError(f"bits = {bits}: allowed 3 or 4")
    if in_features % 32:
        raise ValueError(f"in_features = {in_features}: must be a multiple of 32")
    n_groups = -(-in_features // MMA_GROUP)
    tiles16 = -(-out_features // MMA_ROWS)
    if k_warps is None and n_groups <= MMA_STAGE_GROUPS and tiles16 <= 2 * n_sm:
        # 32-row tiles once 16-row ones would put 2 blocks on an SM: half the blocks stage all of K
        k_warps, rows_per_warp = 8, rows_per_warp or (2 * MMA_ROWS if tiles16 > n_sm else MMA_ROWS)
        k_blocks = k_blocks or 1
    if rows_per_warp is None or k_warps is None:  # whichever the cost model prefers
        plans = [plan_gemv(out_features, in_features, bits, group_size, n_sm, r, k_blocks, persistent,
                           k_warps or 1, early_load)
                 for r in ((MMA_ROWS, 2 * MMA_ROWS) if rows_per_warp is None else (rows_per_warp,))]
        return min(plans, key=lambda p: _plan_cost(p, n_sm))
    if k_warps not in K_WARPS:
        raise ValueError(f"k_warps = {k_warps}: allowed {K_WARPS}")
    early_load = k_warps > 1 if early_load is None else early_load
    if rows_per_warp % MMA_ROWS:
        raise ValueError(f"rows_per_warp = {rows_per_warp}: must be a multiple of {MMA_ROWS}")
    n_tiles = -(-out_features // (WARPS // k_warps * rows_per_warp))

    def make(kb: int) -> GemvPlan:
        groups = min(MMA_STAGE_GROUPS, -(-n_groups // kb))
        kb = -(-n_groups // groups)
        tiles = -(-n_tiles * kb // (n_sm * MMA_MIN_BLOCKS)) if persistent else 1
        return GemvPlan(bits, out_features, in_features, rows_per_warp, kb, groups, tiles, k_warps, early_load)

    if k_blocks is not None:
        return make(k_blocks)
    return min((make(kb) for kb in range(-(-n_groups // MMA_STAGE_GROUPS), n_groups + 1)),
               key=lambda p: (_plan_cost(p, n_sm), p.k_blocks))


def _plan_cost(p: GemvPlan, n_sm: int) -> float:
    """Time of a plan in steps of one warp over 128 inputs x 16 rows: waves x (staging + tiles x (steps +
    epilogue)). Coefficients fitted to bench/gemv_variants.py runs: staging ~3 steps, a tile's epilogue
    ~1 step + 1/8 step per K part summed at the arrival; two mma tiles per warp make a step twice as long;
    K warps (only when asked for: the default plans choose them by rule, see `plan_gemv`) an unfitted
    half step for their shared-memory sum."""
    waves = -(-p.grid[0] * p.grid[1] // (n_sm * MMA_MIN_BLOCKS))
    return waves * (3 + p.tiles_per_block * (p.steps_per_tile * p.rows_per_warp / MMA_ROWS + 1 + p.k_blocks / 8
                                             + (0.5 if p.k_warps > 1 else 0)))


@dataclass
class SplitOutput:
    """Scratch for an output summed from `n_parts` parts: float32 partials and one counter per row tile.

    Parts 0 .. k_blocks-1 are the GEMV's K blocks; a concurrent correction writes the parts after them.
    Counters must be zero before a step; the block that completes a tile resets its counter.
    """

    partials: object  # float32 [n_parts * n_out] device array
    counters: object  # int32 [n_tiles] device array
    n_parts: int
    n_out: int
    tile_rows: int
    k_blocks: int  # the GEMV plan's K blocks it was made for (another plan's would write a correction's part)

    @classmethod
    def allocate(cls, n_out: int, tile_rows: int, k_blocks: int, extra_parts: int = 0) -> "SplitOutput":
        n_tiles, n_parts = -(-n_out // tile_rows), k_blocks + extra_parts
        return cls(cuda.to_device(np.zeros(n_parts * n_out, np.float32)),
                   cuda.to_device(np.zeros(n_tiles, np.int32)), n_parts, n_out, tile_rows, k_blocks)

    @property
    def n_tiles(self) -> int:
        return -(-self.n_out // self.tile_rows)


# ----------------------------------------------------------------------------------------------------
# the kernel (4-bit, and 3-bit below)
#
# A batch-1 GEMV has one input column, so it wastes 7 of the mma's 8 columns; what it gains is the arithmetic.
# One mma.m16n8k16 multiplies 16 rows x 16 inputs in one instruction, and a 4-bit code becomes an fp16 operand
# with one LOP3: (word & 0x000F000F) | 0x64006400 is the half2 (1024 + q_j, 1024 + q_j+4); with mask
# 0x00F000F0 it is (1024 + 16 q, ...), and after `word >> 8` the other two pairs. So 8 codes cost 1 shift + 4
# LOP3 and a share of an mma, where decoding each code to a float and multiplying it on the CUDA cores costs
# several instructions a code. The 1024 offset is not subtracted per code: the mma sums in float32, and sum_k
# (1024 + q_k) b_k = 1024 sum_k b_k + sum_k q_k b_k, so each group's 1024 sum b is subtracted once per row (C
# below). The inputs b are x * act_scale * f in fp16, with f a power of two chosen per group so that the
# group's largest |b| lies in [2^14, 2^15): no overflow, no precision lost to the scaling. Per group, not per
# block: the 8 threads that stage a group find its maximum and its sums by warp shuffles, so the staging
# needs one barrier and no shared atomics, and each step's result is scaled back by its group's 1 / f.
#
# Layout: k may be permuted freely inside a group as long as A and B agree, so lane (g, t) (g = lane
# // 4, t = lane % 4) loads the 4 words (one 128-bit load, 32 inputs) t of its group for rows g and g+8
# and uses them as they are: word m's pairs P0..P3 = inputs (0, 4), (1, 5), (2, 6), (3, 7) of the word
# are the A registers of two mmas. The staged B holds the matching inputs in the same order:
# xs[group * 80 + t * 20 + s] = half2 of inputs 32 t + 8 m + (alpha, alpha + 4), slot s = 4 m + alpha,
# divided by the power of two its A carries q at (`slot_shifts`: 16 for odd alpha at 4 bits). Pitch 20
# (not 16) keeps the four t's reads in distinct banks.
#
# 3-bit: a lane-row's 32 codes of a group fill 3 words, each half of a word holding 5 codes whole: slots
# s = 5 w + f (f = 0..4) of word w at bits 0, 3, 6 (in place: x 1, x 8, x 64 in the mantissa) and 10, 13
# (the word >> 10 first), the low and high halves carrying the pair's two codes; slot 15's codes take bit
# 9 of each half of all 3 words (bit b of the code in word b). A pair costs one LOP3, (src & mask) | magic,
# plus a shift per word: about as many instructions per code as at 4 bits. Each slot's power of two is
# undone by its staged input (`slot_shifts`), so the staged inputs, the mma and the epilogue are shared with
# the 4-bit kernel. A lane's step reads 16 + 8 bytes (rows g and g + 8).


def _mma_step_source(bits: int, m_tiles: int, n_groups: int, exact_rows: bool) -> str:
    """Source of one lane's step over `m_tiles` mma tiles, as `load` and `dots`, written out statement by
    statement: Numba keeps the tiles' words in registers only when every index is a constant, and NVVM
    does not fully unroll loops this large by itself. `load` issues the tile's weight loads (`mma_layout`:
    constant offsets, folded into the load instruction) and the lane's row (scale, zero) pair, and returns
    them untouched (fp16 still: converting would wait for the load). `dots` goes word by word (4
    staged pairs live at a time), running each tile's 2 mmas of the word, and returns per tile the
    lane's row's scale * (sum_k (q_k - z) b_k)."""
    words = MMA_GROUP_WORDS[bits]  # uint32 per (16-row block, group) in `mma_layout`
    load = ["def load(qw, scale_zero, tw, row0, last_row, lane4, gi, sel8):"]  # uint32 indices (< 2^32 words)
    load.append(f"    base = uint32((tw * uint32({n_groups}) + gi) * uint32({words}))")
    load.append("    wb = uint64(base + lane4)")
    if bits == 3:
        load.append("    hb = uint64(base + (lane4 >> uint32(1)))")
    if exact_rows:
        load.append(f"    sb = uint64(uint32((row0 + sel8) * uint32({n_groups}) + gi))")
    ret = []
    for mt in range(m_tiles):
        off = mt * n_groups * words
        if bits == 4:  # rows g and g + 8: 512 contiguous bytes for the warp each
            for h in range(2):
                load.append(f"    w{mt}{h} = load_u32x4(qw, wb + uint64({off + h * 128}))")
                ret += [f"w{mt}{h}[{i}]" for i in range(4)]
        else:  # words 0, 1 of rows g and g + 8 (512 bytes for the warp), then their words 2 (256)
            load += [f"    l{mt} = load_u32x4(qw, wb + uint64({off}))", f"    h{mt} = load_u32x2(qw, hb + uint64({off + 128}))"]
            ret += [f"l{mt}[{i}]" for i in range(4)] + [f"h{mt}[{i}]" for i in range(2)]
        addr = f"sb + uint64({MMA_ROWS * mt * n_groups})" if exact_rows else \
            f"uint32(min(row0 + uint32({MMA_ROWS * mt}) + sel8, last_row) * uint32({n_groups}) + gi)"
        load.append(f"    sz{mt} = scale_zero[{addr}]")
        ret.append(f"sz{mt}")
    load.append(f"    return ({', '.join(ret)},)")
    per_tile = 9 if bits == 4 else 7  # words + the (scale, zero) pair
    dots = ["def dots(v, xs, xo, c, sz, inv_f, upper, magic, swap):"]
    dots += [f"    d{mt} = (float32(0), float32(0), float32(0), float32(0))" for mt in range(m_tiles)]
    for m in range(4):
        dots += [f"    x{a} = xs[xo + uint32({4 * m + a})]" for a in range(4)]  # unsigned: no wraparound
        for mt in range(m_tiles):
            v0 = per_tile * mt
            if bits == 4:  # word m of rows g (a) and g + 8 (b); slot alpha: (w >> 8 (alpha // 2)) & mask
                pairs = {(r, alpha): f"({w if alpha < 2 else f'({w} >> uint32(8))'} & "
                                     f"uint32({_MASK_HI if alpha % 2 else _MASK_LO:#x})) | magic"
                         for r, w in (("a", f"v[{v0 + m}]"), ("b", f"v[{v0 + 4 + m}]")) for alpha in range(4)}
            else:  # the lane-row's words (v0, v1, v4) (row g) or (v2, v3, v5) (row g + 8)
                pairs = {(r, alpha): _pair_3bit([f"v[{i}]" for i in words], 4 * m + alpha)
                         for r, words in (("a", (v0, v0 + 1, v0 + 4)), ("b", (v0 + 2, v0 + 3, v0 + 5)))
                         for alpha in range(4)}
            for xa, xb in ((0, 1), (2, 3)):  # slots 4 m + xa and 4 m + xb of both rows: one mma
                dots.append(f"    d{mt} = mma_f16({pairs['a', xa]}, {pairs['b', xa]}, {pairs['a', xb]}, "
                            f"{pairs['b', xb]}, x{xa}, x{xb}, d{mt}[0], d{mt}[1], d{mt}[2], d{mt}[3], swap)")
    outs = []
    for mt in range(m_tiles):
        dots.append(f"    s{mt}, z{mt} = half2_floats(v[{per_tile * mt + per_tile - 1}])")
        dots.append(f"    e{mt} = s{mt} * inv_f * ((d{mt}[2] if upper else d{mt}[0]) - (c + z{mt} * sz))")
        outs.append(f"e{mt}")
    dots.append(f"    return ({', '.join(outs)},)")
    return "\n".join(load) + "\n\n\n" + "\n".join(dots) + "\n"


def _pair_3bit(words: list[str], slot: int) -> str:
    """Source of slot `slot`'s operand (codes in the mantissas of fp16 1024) from a lane-row's 3 words."""
    if slot == _SPARE_SLOT:  # bit b of each code in word b, bit 9 of each half: gathered at bits 7..9
        return (f"(({words[0]} >> uint32(2)) & uint32(0x00800080)) | (({words[1]} >> uint32(1)) & "
                f"uint32(0x01000100)) | ({words[2]} & uint32(0x02000200)) | magic")
    w, f = divmod(slot, 5)
    src = words[w] if f < 3 else f"({words[w]} >> uint32(10))"
    return f"({src} & uint32({_FIELD_3BIT << 3 * (f % 3):#x})) | magic"


def slot_shifts(bits: int) -> int:
    """log2 of the factor each slot's codes carry in their fp16 operand (the 4-bit masks, `_pair_3bit`),
    3 bits a slot (slot s at bits 3 s): one constant the staging reads with constant shifts."""
    shift = (lambda s: 4 * (s % 2)) if bits == 4 else (lambda s: 7 if s == _SPARE_SLOT else 3 * (s % 5 % 3))
    return sum(shift(s) << 3 * s for s in range(16))


def mma_layout(qweight: torch.Tensor, bits: int, in_features: int, tile_rows: int) -> torch.Tensor:
    """qweight int32 [out, in * bits / 32] (FORMATS.md) -> the tensor-core kernel's device layout, flat
    int32. Rows are padded with zero codes to whole tiles and inputs to whole groups (so no load needs a
    clamp). Lane l = 4 g + t of 16-row block T takes inputs 128 G + 32 t + 8 m + j (word m = 0..3,
    j = 0..7) of group G for rows 16 T + g (half h = 0) and 16 T + 8 + g (h = 1); per (T, G):
    - 4-bit, 256 words: [h][lane][m], the FORMATS.md words as they are (nibble j of word m);
    - 3-bit, 192 words: [lane][h][w] words w = 0, 1 (128), then [lane][h] words 2 (64). Slot s = 4 m + a
      (a = 0..3) holds codes j = a (low half) and a + 4 (high half) of word m; slots s = 5 w + f < 15 sit
      whole in word w at bit 3 f (f < 3) or 3 f + 1 of each half, slot 15's code bit b at bit 9 of each
      half of word b (`_pair_3bit` decodes them).
    A warp's 128-bit load of one part reads 512 contiguous bytes (256 for the 3-bit high words)."""
    out_features = qweight.shape[0]
    rows = -(-out_features // tile_rows) * tile_rows
    n_groups = -(-in_features // MMA_GROUP)
    if bits == 4:
        words = in_features // 8
        padded = torch.zeros((rows, n_groups * 16), dtype=torch.int32, device=qweight.device)
        padded[:out_features, :words] = qweight
        return padded.view(rows // 16, 2, 8, n_groups, 4, 4).permute(0, 3, 1, 2, 4, 5).contiguous().view(-1)
    # 3-bit: decode to codes and re-pack, LAYOUT_ROWS rows at a time (int64 work arrays ~30 B per code)
    parts = []
    for r0 in range(0, rows, LAYOUT_ROWS):
        n = min(LAYOUT_ROWS, rows - r0)
        codes = torch.zeros((n, n_groups * MMA_GROUP), dtype=torch.int64, device=qweight.device)
        if r0 < out_features:
            codes[:min(n, out_features - r0), :in_features] = unpack_codes(qweight[r0:r0 + n], bits, in_features)
        parts.append(_words_3bit(codes))
    return torch.cat(parts)


LAYOUT_ROWS = 1024  # rows `mma_layout` re-packs at once (a multiple of 16)


def _words_3bit(codes: torch.Tensor) -> torch.Tensor:
    """Codes int64 [rows, groups * 128] (rows a multiple of 16) -> `mma_layout`'s 3-bit words, flat int32."""
    rows, n_groups = codes.shape[0], codes.shape[1] // MMA_GROUP
    # [T, h, g, G, t, m, half, a] -> [T, G, g, t, h, slot = 4 m + a, half]
    c = codes.view(rows // 16, 2, 8, n_groups, 4, 4, 2, 4).permute(0, 3, 2, 4, 1, 5, 7, 6).reshape(
        rows // 16, n_groups, 8, 4, 2, 16, 2)
    half = 16 * torch.arange(2, device=codes.device)
    f = torch.arange(15, device=codes.device) % 5
    whole = (c[..., :15, :] << (3 * f + (f >= 3).long())[:, None] + half).view(*c.shape[:-2], 3, 5, 2).sum((-1, -2))
    spare = (c[..., 15, None, :] >> torch.arange(3, device=codes.device)[:, None] & 1) << 9 + half
    words = words_to_int32(whole + spare.sum(-1))  # [T, G, g, t, h, w]
    first = words[..., :2].reshape(rows // 16, n_groups, 128)
    return torch.cat([first, words[..., 2].reshape(rows // 16, n_groups, 64)], dim=-1).reshape(-1)


@functools.lru_cache(maxsize=None)
def _make_mma_step(bits: int, m_tiles: int, n_groups: int, exact_rows: bool):
    src = _mma_step_source(bits, m_tiles, n_groups, exact_rows)
    name = f"<base_gemv.mma_step bits={bits} m_tiles={m_tiles} n_groups={n_groups} exact={exact_rows}>"
    linecache.cache[name] = (len(src), None, src.splitlines(True), name)
    scope = {"uint32": uint32, "uint64": uint64, "float32": float32, "load_u32x4": load_u32x4,
             "load_u32x2": load_u32x2, "mma_f16": mma_f16, "half2_floats": half2_floats}
    exec(compile(src, name, "exec"), scope)
    return cuda.jit(device=True)(scope["load"]), cuda.jit(device=True)(scope["dots"])


@functools.lru_cache(maxsize=None)
def _mma_kernel(bits: int, m_tiles: int, n_groups: int, exact_rows: bool, k_warps: int = 1, early_load: bool = False,
                prologue: str = "fp16", residual: bool = False):
    """The tensor-core kernel for one (bits, m_tiles, group count, k_warps); `exact_rows`: the rows fill
    whole tiles (no clamps on scale / zero rows); `early_load`: the first weights are loaded before the
    staging; `prologue` (`PROLOGUES`) and `residual`: the glue folded into it. See the section comment."""
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue = {prologue!r}: allowed {PROLOGUES}")
    SHIFTS = slot_shifts(bits)
    NORM = prologue == "rms_norm"
    ACT = prologue in ACT_PROLOGUES
    GELU = prologue == "gelu_tanh"
    RESID = residual
    PDL = pdl_supported()
    KW = k_warps
    EARLY = early_load
    TILE = WARPS // KW * MMA_ROWS * m_tiles
    RED = KW * TILE if KW > 1 else 1  # the K warps' row sums at a tile's end
    TILES16 = TILE // MMA_ROWS
    GROUP_WORDS = 4 * MMA_PITCH
    XS_WORDS = MMA_STAGE_GROUPS * GROUP_WORDS  # shared sizes must be literal constants for Numba
    STAGE_GROUPS = MMA_STAGE_GROUPS
    CHUNK = 16  # inputs one thread stages: a quarter-word pair of one t
    assert MMA_STAGE_GROUPS * MMA_GROUP == CHUNK * THREADS  # one chunk per thread stages a full K block
    SWAP = THREADS * MMA_SWAP if SIMULATED else 1
    load, dots = _make_mma_step(bits, m_tiles, n_groups, exact_rows)

    @cuda.jit(device=True)
    def finish_mma_tile(acc, red, out, partials, counters, flags, n_out, n_parts, kb, tile, row_warp, kw, direct,
                        row_scale, resid):
        """A row tile's end: each row's sum times `row_scale` (over the K warps, through `red`, when KW > 1)
        written as the output (`direct`) or as this K block's float32 part, then the arrival. Lanes t = 0
        and 2 hold rows g, g + 8."""
        tid = cuda.threadIdx.x
        lane = tid % 32
        t = lane % 4
        for mt in range(m_tiles):
            r = row_warp * MMA_ROWS * m_tiles + MMA_ROWS * mt + lane // 4 + 8 * (t // 2)  # row within the tile
            if t % 2 == 0:
                if KW > 1:
                    red[kw * TILE + r] = acc[mt] * row_scale
                elif tile * TILE + r < n_out:
                    write_row(out, partials, n_out, kb, tile * TILE + r, acc[mt] * row_scale, direct, resid, RESID)
            acc[mt] = float32(0)
        if KW > 1:
            cuda.syncthreads()
            if tid < TILE and tile * TILE + tid < n_out:
                total = float32(0)
                for q in range(KW):  # in a fixed order: deterministic
                    total += red[q * TILE + tid]
                write_row(out, partials, n_out, kb, tile * TILE + tid, total, direct, resid, RESID)
        if not direct:
            arrive_gemv_tile(partials, counters, out, n_out, n_parts, TILE, tile, flags, resid, RESID)
        elif KW > 1:
            cuda.syncthreads()  # `red` is rewritten at the next tile's end

    @jit_with_bounds(THREADS, MMA_MIN_BLOCKS)
    def kernel(x, act_scale, qw, scale_zero, out, partials, counters, resid, n_out, n_in, groups_per_kblock,
               direct, n_parts, magic_bits, eps):
        """y[row] = sum over this block's K range of deq(Q)[row, i] * x~[i], on tensor cores, where x~ is
        the prologue's input times act_scale: x[i] (fp16), x[i] / rms(x) (rms_norm: x float32, the norm's
        weight folded into act_scale; every block sums all of x's squares, 1 / rms scales its rows at
        the end), or act(x[i]) * x[n_in + i] (silu / gelu_tanh: x the gate_up output, fp16 [2 n_in]).
        With `residual` the output is float32 out[row] = resid[row] + y[row] (the residual add).

        Layout: qw flat uint32 in `mma_layout`; scale_zero flat uint32 [out * n_groups], the fp16 pair
        (scale, zero) of a (row, group) (one load, one register); out fp16 [out];
        partials flat f32 [n_parts * out]. Launch: grid (G, k_blocks), block 256. Block (b, kb) stages
        the inputs of groups [kb * P, (kb + 1) * P) (P = groups_per_kblock) once as fp16 pairs, then
        takes row tiles b, b + G, ... (TILE = 128 m_tiles / KW rows; warp w the 16 m_tiles rows from
        tile * TILE + 16 m_tiles (w // KW), and of the block's groups those = w % KW mod KW), one
        (tile, group) step after another with the next step's loads in flight; with KW > 1 the K warps'
        row sums meet in shared memory at the tile's end.
        Bytes: the packed weights once (128-bit loads, a warp's 1 KiB of a step contiguous),
        scales + zeros once (4 B per row and group), x and act_scale once per block (6 B per input; 8 B
        with rms_norm, its whole x; 8 B with an activation), 2 B per row out (+ 4 B per row and K block
        when K is split or merged; 8 B with `residual`).
        Launched behind a programmatic edge, the block loads its first weights (EARLY) before
        `wait_upstream`, while the kernel before it still runs.
        """
        magic = uint32(magic_bits)
        xs = cuda.shared.array(XS_WORDS, uint32)
        grp_c = cuda.shared.array(STAGE_GROUPS, float32)
        grp_s = cuda.shared.array(STAGE_GROUPS, float32)
        grp_f = cuda.shared.array(STAGE_GROUPS, float32)  # the group's 1 / f
        scratch = cuda.shared.array(SCRATCH, float32)
        flags = cuda.shared.array(FLAG_CAP, int32)
        swap = cuda.shared.array(SWAP, uint32)
        red = cuda.shared.array(RED, float32)
        sq = cuda.shared.array(WARPS, float32)  # rms_norm: each warp's square sum of x
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        row_warp = warp // KW
        kw = warp % KW  # this warp takes the block's groups kw, kw + KW, ...
        t = lane % 4
        kb = cuda.blockIdx.y
        grp0 = kb * groups_per_kblock
        n_grp = min(groups_per_kblock, (n_in + MMA_GROUP - 1) // MMA_GROUP - grp0)
        n_steps = (n_grp + KW - 1) // KW  # every warp takes as many (barriers at a tile's end); a step
        # past the last group loads the last group again and drops it (it costs one step of KW > 1 plans
        # whose K warps do not divide the groups)

        n_tiles = (n_out + TILE - 1) // TILE
        stride = cuda.gridDim.x
        tile = cuda.blockIdx.x
        # indices in uint32 (a weight matrix has < 2^32 words): 64-bit index math costs twice the instructions
        last_row = uint32(n_out - 1)
        last_grp = n_grp - 1
        lane_row = uint32(row_warp * MMA_ROWS * m_tiles + lane // 4)
        sel8 = uint32(8 * (t // 2))  # lanes t = 0, 1 finish row g, lanes 2, 3 row g + 8
        upper = t >= 2
        t_pitch = uint32(t * MMA_PITCH)
        lane4 = uint32(4 * lane)
        warp_t16 = uint32(row_warp * m_tiles)  # the warp's first 16-row block within a tile
        acc = cuda.local.array(m_tiles, float32)
        for mt in range(m_tiles):
            acc[mt] = float32(0)
        # the first (tile, step)'s weights: before the staging when EARLY (its HBM latency then overlaps the
        # staging's; what a block of one or two steps waits on), else after it (fewer live registers)
        if EARLY:
            words = load(qw, scale_zero, uint32(tile * TILES16) + warp_t16, uint32(tile * TILE) + lane_row,
                         last_row, lane4, uint32(grp0 + min(kw, last_grp)), sel8)
        if PDL:  # the weights are the graph's constants; x and the split output are the step's
            wait_upstream()
            release_dependents()
        # stage: thread tid takes inputs [16 p, 16 p + 16) of group tid // 8 (p = tid % 8), i.e. words
        # 2 (p % 2) and 2 (p % 2) + 1 of lane t = p // 2; zeros past the end of the input
        sg = tid // 8  # the group this thread stages, with the 7 lanes beside it
        p = tid % 8
        e0 = uint32((grp0 + sg) * MMA_GROUP + CHUNK * p)
        last_in = uint32(n_in - 1)
        vals = cuda.local.array(CHUNK, float32)
        raw = cuda.local.array(CHUNK, float32)  # rms_norm: x itself, for its square sum
        if sg < n_grp:  # one branch around every load (index clamped), so all issue before the first use; a
            for i in range(CHUNK):  # branch around each made it wait for its data before the next issued
                j = min(e0 + uint32(i), last_in)
                if ACT:
                    vals[i] = act_value(float32(x[j]), GELU) * float32(x[uint32(n_in) + j]) * act_scale[j]
                else:
                    raw[i] = float32(x[j])
                    vals[i] = raw[i] * act_scale[j]
        vmax = float32(0)
        ss = float32(0)
        for i in range(CHUNK):
            valid = sg < n_grp and e0 + i < n_in
            vals[i] = vals[i] if valid else float32(0)
            vmax = max(vmax, abs(vals[i]))
            if NORM and valid:
                ss += raw[i] * raw[i]
        if NORM:  # the squares of x outside this block's K range, then one slot per warp (summed after the
            # staging's barrier: the norm adds none)
            k_lo = grp0 * MMA_GROUP
            k_hi = min(n_in, k_lo + n_grp * MMA_GROUP)
            if k_lo > 0 or k_hi < n_in:
                for j in range(tid, n_in, THREADS):
                    if j < k_lo or j >= k_hi:
                        ss += x[j] * x[j]
            ss = warp_sum(ss, scratch)
            if lane == 0:
                sq[warp] = ss
        vmax = lanes8_max(vmax, scratch)
        f_exp = min(max(268 - ((float_as_int(vmax) >> 23) & 0xFF), 1), 253)  # largest |b| in [2^14, 2^15)
        f = int_as_float(int32(f_exp << 23))
        c_sum = float32(0)
        s_sum = float32(0)
        shifts = uint64(SHIFTS) >> uint64(24 * (p % 2))  # this thread's slots 8 (p % 2) + i
        for i in range(8):  # pair (word 2 (p % 2) + i // 4, alpha = i % 4)
            j = 8 * (i // 4) + i % 4
            sh = int32((shifts >> uint64(3 * i)) & uint64(7))
            mult = f * int_as_float(int32((127 - sh) << 23))
            h = pack_half2(vals[j] * mult, vals[j + 4] * mult)
            if sg < n_grp:
                xs[sg * GROUP_WORDS + (p // 2) * MMA_PITCH + (2 * (p % 2) + i // 4) * 4 + i % 4] = h
            lo, hi = half2_floats(h)
            c_sum += lo + hi
            s_sum += (lo + hi) * int_as_float(int32((127 + sh) << 23))
        c_sum = lanes8_sum(c_sum, scratch)
        s_sum = lanes8_sum(s_sum, scratch)
        if p == 0:
            grp_c[sg] = float32(1024) * c_sum
            grp_s[sg] = s_sum
            grp_f[sg] = int_as_float(int32((254 - f_exp) << 23))
        cuda.syncthreads()
        row_scale = float32(1)
        if NORM:
            total = float32(0)
            for w in range(WARPS):
                total += sq[w]
            row_scale = float32(1) / math.sqrt(total / float32(n_in) + eps)

        # the next (tile, step)'s weights are loaded while this one is computed (one step ahead: deeper
        # prefetch, or all staging loads before their use, timed slower in bench/gemv_variants.py)
        ltile = tile  # the load cursor, one (tile, step) ahead of the computation's
        lstep = 0
        if not EARLY:
            words = load(qw, scale_zero, uint32(tile * TILES16) + warp_t16, uint32(tile * TILE) + lane_row,
                         last_row, lane4, uint32(grp0 + min(kw, last_grp)), sel8)
        step = 0
        while tile < n_tiles:  # (a loop on the cursors: no step counter held in a register)
            lstep += 1
            if lstep == n_steps:
                lstep = 0
                ltile += stride
            ahead = words
            if ltile < n_tiles:
                lgrp = lstep if KW == 1 else min(lstep * KW + kw, last_grp)  # KW = 1: no clamp (registers)
                ahead = load(qw, scale_zero, uint32(ltile * TILES16) + warp_t16, uint32(ltile * TILE) + lane_row,
                             last_row, lane4, uint32(grp0 + lgrp), sel8)
            cur = words
            words = ahead
            next_step = step + 1
            next_tile = tile
            if next_step == n_steps:
                next_step = 0
                next_tile = tile + stride
            grp = step * KW + kw
            # unsigned indices: Numba adds a negative-index wraparound to signed ones
            ugrp = uint32(step) if KW == 1 else uint32(min(grp, last_grp))
            e = dots(cur, xs, ugrp * uint32(GROUP_WORDS) + t_pitch, grp_c[ugrp], grp_s[ugrp], grp_f[ugrp], upper,
                     magic, swap)
            if KW == 1 or grp < n_grp:
                for mt in range(m_tiles):
                    acc[mt] += e[mt]
            if next_step == 0:  # tile complete: lanes t = 0 and 2 hold whole rows g and g + 8
                finish_mma_tile(acc, red, out, partials, counters, flags, n_out, n_parts, kb, tile, row_warp, kw,
                                direct, row_scale, resid)
            tile = next_tile
            step = next_step

    return kernel


def _flat(a, dtype=None):
    """A flat (1-D) view of a contiguous device array, optionally reinterpreted as dtype."""
    flat = a.reshape(int(np.prod(a.shape)))
    return flat if dtype is None else flat.view(dtype)


def _device(a):
    """A Numba device array for a Numba array, a CUDA torch tensor or any __cuda_array_interface__."""
    if isinstance(a, torch.Tensor):
        return cuda.as_cuda_array(a.detach(), sync=False)
    return a if hasattr(a, "copy_to_host") else cuda.as_cuda_array(a)


class BaseGemv:
    """A prepared GEMV: device views of one quantized linear, its plan and kernel; call it per token.

    qweight int32 [out, in * bits / 32], scales / zeros fp16 [out, ceil(in / 128)], act_scale f32 [in]
    (device arrays or CUDA tensors; converted once here, never per launch).
    """

    def __init__(self, qweight, scales, zeros, act_scale, bits: int, group_size: int = 128,
                 plan: GemvPlan | None = None):
        _check_group(group_size)
        qweight, scales, zeros, act_scale = (_device(a) for a in (qweight, scales, zeros, act_scale))
        out_features, in_features = qweight.shape[0], act_scale.shape[0]
        if qweight.shape[1] * 32 != in_features * bits:
            raise ValueError(f"qweight has {qweight.shape[1]} words a row; {in_features} inputs at {bits} bits "
                             f"need {in_features * bits // 32}")
        self.n_sm = 132 if SIMULATED else cuda.get_current_device().MULTIPROCESSOR_COUNT
        self.plan = plan or plan_gemv(out_features, in_features, bits, group_size, self.n_sm)
        p = self.plan
        if (p.out_features, p.in_features, p.bits) != (out_features, in_features, bits):
            raise ValueError(f"plan is for a {p.out_features}x{p.in_features} {p.bits}-bit linear, "
                             f"not {out_features}x{in_features} {bits}-bit")
        self.act_scale = act_scale
        # copies in the kernel's own layouts; the caller may free `qweight`
        if SIMULATED:
            self.qw = cuda.to_device(mma_layout(torch.from_numpy(qweight.copy_to_host()), bits, in_features,
                                                p.tile_rows).numpy().view(np.uint32))
            scale_zero = np.stack([scales.copy_to_host(), zeros.copy_to_host()], -1).view(np.uint32)
            self.weights = (self.qw, cuda.to_device(scale_zero.reshape(-1)))
        else:
            self._qw_tiled = mma_layout(torch.as_tensor(qweight, device="cuda"), bits, in_features, p.tile_rows)
            self._scale_zero = torch.stack([torch.as_tensor(scales, device="cuda"),
                                            torch.as_tensor(zeros, device="cuda")], -1).view(torch.int32)
            self.qw = _flat(_device(self._qw_tiled), np.uint32)
            self.weights = (self.qw, _flat(_device(self._scale_zero), np.uint32))
        self.kernel = self.kernel_for("fp16", False)
        self._own_split: SplitOutput | None = None

    def kernel_for(self, prologue: str, residual: bool):
        """The kernel of this plan with `prologue` and the residual add folded in (`_mma_kernel`)."""
        p = self.plan
        return _mma_kernel(p.bits, p.rows_per_warp // MMA_ROWS, -(-p.in_features // MMA_GROUP),
                           p.out_features % p.tile_rows == 0, p.k_warps, p.early_load, prologue, residual)

    def beside(self, blocks: int) -> "BaseGemv":
        """This GEMV re-planned to run beside `blocks` resident blocks of another kernel that each fill
        an SM's register file (a DecDEC correction's): its grid must fit the block slots of the SMs left
        in one wave, or the blocks that find no slot run after the correction, a second wave. A plan that
        fits stays; one that does not takes the plan the cost model picks for the SMs left, K split
        included (growing only the tiles per block would make every block that much longer). Same
        weights, kernel and tiles (rows per warp, K warps), so the correction's merge tiles still match;
        the split output must come from the twin's plan (its K blocks may differ), and the sum's order,
        hence its last bits, may differ from the first plan's."""
        p = self.plan
        n_sm = max(1, self.n_sm - blocks)
        if p.grid[0] * p.grid[1] <= n_sm * MMA_MIN_BLOCKS:
            return self
        plan = plan_gemv(p.out_features, p.in_features, p.bits, n_sm=n_sm, rows_per_warp=p.rows_per_warp,
                         k_warps=p.k_warps, early_load=p.early_load)
        twin = copy.copy(self)
        twin.plan, twin._own_split = plan, None
        return twin

    def split_output(self, extra_parts: int = 0) -> SplitOutput:
        """Scratch for this GEMV's K blocks plus `extra_parts` merged parts (1 for a DecDEC correction)."""
        p = self.plan
        return SplitOutput.allocate(p.out_features, p.merge_rows, p.k_blocks, extra_parts)

    def __call__(self, x, out, stream=0, merge: SplitOutput | None = None, *, prologue: str = "fp16",
                 act_scale=None, eps: float = 0.0, resid=None) -> None:
        """Launch on `stream`: out = deq(Q) @ x~ plus any merged part; x~ = x * act_scale with the plain
        fp16 prologue, else as `_mma_kernel`'s `prologue` makes it (rms_norm: give `act_scale` = the norm's
        weight times this GEMV's act_scale, and `eps`). out is fp16 [out], or float32 with `resid` (float32
        [out]): out = resid + deq(Q) @ x~, the residual add (out may be resid itself)."""
        p = self.plan
        check_prologue_input(x, prologue, p.in_features)
        if merge is None and p.k_blocks > 1:
            if self._own_split is None:
                self._own_split = self.split_output()
            merge = self._own_split
        if merge is not None and (merge.n_out != p.out_features or merge.tile_rows != p.merge_rows
                                  or merge.k_blocks != p.k_blocks):
            raise ValueError("merge scratch was made for another GEMV plan")
        direct = merge is None
        partials = merge.partials if merge else dummy_array(np.float32)
        counters = merge.counters if merge else dummy_array(np.int32)
        n_parts = merge.n_parts if merge else 1
        kernel = self.kernel if prologue == "fp16" and resid is None else self.kernel_for(prologue, resid is not None)
        kernel[p.grid, THREADS, stream](
            x, self.act_scale if act_scale is None else act_scale, *self.weights, out, partials, counters,
            dummy_array(np.float32) if resid is None else resid, p.out_features, p.in_features, p.groups_per_kblock,
            direct, n_parts, MMA_MAGIC, np.float32(eps))


@functools.lru_cache(maxsize=None)
def dummy_array(dtype) -> object:
    """A 1-element device array for kernel arguments a launch does not use."""
    return cuda.to_device(np.zeros(1, dtype))
