"""Correction op: out = base_out + R_hat[:, sel] @ x~[sel], the DecDEC dynamic error compensation.

x~ = x * act_scale is what the GEMV sees; `sel` is `ops.selector.select_bucket(x~, k_chunk, bounds)`;
R_hat[o, i] = (nibble - 8) * scales[o] from the residual table (docs/FORMATS.md, "Residual table").

`correction_reference` is the CPU version. `correction_cuda` / `Correction` is one fused Numba kernel on
`n_tb` thread blocks: each block selects the chunk's channels itself (the same `select_chunk` as
`ops.selector_cuda`, so every block agrees on the set), fetches the chosen residual rows from mapped host
memory (zero-copy, `ops.dma.PinnedTable`) or device memory, dequantizes, multiplies by the chosen
activations and merges into the output. It is meant to run on a second stream while the base GEMV runs.

The merge (Numba has no fp16 atomic add, and the two kernels run concurrently, so neither may simply
add into the other's output): the correction is more *parts* of the base GEMV's split output
(`ops.base_gemv.SplitOutput`), one per selection pass (`Correction.parts`; a pass takes up to 4
chunks of 1024 inputs). Each block owns whole row tiles of the base GEMV and one pass's chunks,
writes its float32 correction of those rows as that pass's part, then arrives at each tile's int32
counter; whichever kernel completes a tile last (base K blocks or correction) sums the parts in a
fixed order and writes fp16. A wide input's passes thus run side by side rather than one after
another in every block. Why it is fast: no float atomics, no memset, no extra launch or finishing
kernel, no waiting: the only extra traffic is 8 bytes per output row and part (one float32 written,
read back once) and one int32 atomic per 64 rows and part. The sum order is fixed, so the result is
deterministic, as is the selection.
Stand-alone (no `merge`), each block writes out[o] = base_out[o] + corr[o] for its rows.

Launch it on a high-priority side stream (torch.cuda.Stream(priority=-1)): its few blocks are then
dispatched before the base GEMV's, which keeps the overlapped slowdown small where the GEMV is long.
Its floor on short layers is one selection pass (every block selects every chunk itself) and one PCIe
round trip for the fetch; bench/correction_floor.py breaks it down.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from numba import cuda, float32, int32, uint32, uint64

from decdec.ops.base_gemv import (FLAG_CAP, SplitOutput, arrive_tiles, check_prologue_input, dummy_array, int_as_float,
                                  jit_with_bounds)
from decdec.ops.layout import unpack_rows
from decdec.ops.ptx import pdl_supported, release_dependents, wait_upstream
from decdec.constants import chunk_ks
from decdec.ops.selector import BucketBounds, select_bucket, selection_mask
from decdec.ops.reduce import SCRATCH, WARPS_MAX, block_sum
from decdec.ops.selector_cuda import (CUTS_SIZE, GROUP_SIZE, HIST_SIZE, MAX_CHUNK, SCAN_SIZE, SEL_CAP, STASH_SIZE,
                                      XT_NORM, XT_OF_PROLOGUE, pass_chunks, select_chunks)

WORD_OUTPUTS = 8  # outputs per uint32 word of a residual row (8 nibbles)
UNROLL = 8  # chosen rows whose (PCIe) loads one thread has in flight at once
THREADS = 512  # ptxas needs up to 128 registers (no spills): 512 x 128 fills the register file
RED_SIZE = max(SEL_CAP, THREADS * WORD_OUTPUTS)  # floats: the picks' x~, then the reduction (16 KiB)
TILE_ROWS = 64  # default merge tile: `ops.base_gemv.MERGE_ROWS`
ONE_BITS = 0x3F800000  # float32 1.0: a nibble or-ed into its mantissa decodes without a conversion


# ----------------------------------------------------------------------------------------------------
# CPU reference


def compensate(xs: torch.Tensor, idx: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The correction DecDEC adds to a linear group's output: sum over the picked channels i of
    x~[i] * R_hat[i, :]. xs [..., in] float32 (x~ = x * act_scale), idx [..., n] picked channels,
    residual float32 [in, out] (row i = input channel i's dequantized residual) -> [..., out].
    The one definition of the maths on the CPU: the engine's reference executor, the batch simulation
    of perplexity and the kernel's reference all call it (as a masked product: one matmul per batch)."""
    return (xs * selection_mask(idx, xs.shape[-1])) @ residual


def correction_reference(x: torch.Tensor, base_out: torch.Tensor, residual_rows, residual_scales,
                         bounds: BucketBounds, k_chunk: int, act_scale=None) -> torch.Tensor:
    """What the fused kernel computes: base_out + compensate(x~, select_bucket(x~), R_hat), float32;
    x [..., in] is x~ (times act_scale if given); residual_rows / residual_scales as in the table."""
    xs = torch.as_tensor(x, dtype=torch.float32)
    if act_scale is not None:
        xs = xs * torch.as_tensor(act_scale, dtype=torch.float32)
    scales = torch.as_tensor(np.asarray(residual_scales, dtype=np.float32))
    residual = unpack_rows(torch.as_tensor(np.asarray(residual_rows)), scales.shape[0]) * scales
    return base_out.to(torch.float32) + compensate(xs, select_bucket(xs, k_chunk, bounds), residual)


# ----------------------------------------------------------------------------------------------------
# the fused kernel


@dataclass(frozen=True)
class CorrectionPlan:
    """Blocks own `tiles_per_block` row tiles; threads form ks_n groups of wc_n word columns."""

    n_tb: int
    threads: int
    wc_n: int  # word columns (8 outputs each) a pass covers
    ks_n: int  # thread groups splitting the chosen rows (> 1 only when a block owns few words)
    tile_rows: int
    n_tiles: int
    tiles_per_block: int

    @property
    def blocks(self) -> int:
        return -(-self.n_tiles // self.tiles_per_block)


def plan_correction(out_features: int, n_tb: int, tile_rows: int = TILE_ROWS) -> CorrectionPlan:
    """Split the row tiles over n_tb blocks of 512 threads: one word column (8 outputs) per thread and
    pass; a block owning fewer than 512 words splits the chosen rows over ks_n = 512 // words groups."""
    if n_tb < 1:
        raise ValueError(f"n_tb = {n_tb}: at least one thread block is needed")
    if tile_rows % WORD_OUTPUTS:
        raise ValueError(f"tile_rows = {tile_rows}: must be a multiple of {WORD_OUTPUTS}")
    n_tiles = -(-out_features // tile_rows)
    per_block = -(-n_tiles // n_tb)
    words = -(-min(per_block * tile_rows, out_features) // WORD_OUTPUTS)
    wc_n = min(words, THREADS)
    return CorrectionPlan(n_tb, THREADS, wc_n, THREADS // wc_n, tile_rows, n_tiles, per_block)


@cuda.jit(device=True)
def nib_float(word, j):
    """1 + (4-bit field j of the uint32 word) / 16: the field shifted to mantissa bits 19..22 of 1.0."""
    sh = 19 - 4 * j  # a constant once the caller's j loop is unrolled
    if sh >= 0:
        v = word << uint32(sh)
    else:
        v = word >> uint32(-sh)
    return int_as_float(int32((v & uint32(0x00780000)) | uint32(ONE_BITS)))


@functools.lru_cache(maxsize=None)
def _correction_kernel(merge: bool, prologue: str = "fp16"):
    """The fused select + fetch + dequantize + GEMV + merge kernel (one compiled variant per merge mode and
    base GEMV prologue: x~ is made from x as the GEMV makes it, `ops.selector_cuda._xt`)."""
    PDL = pdl_supported()
    MODE = XT_OF_PROLOGUE[prologue]
    NORM = MODE == XT_NORM

    @cuda.jit(device=True)
    def emit(o, v, o_hi, rscale, base_out, out, partials, part, n_out):
        """Row o's correction v * scale[o]: into the split output's `part`, or added to base_out."""
        if o < o_hi:
            corr = float32(rscale[o]) * v
            if merge:
                partials[part * n_out + o] = corr
            else:
                out[o] = float32(base_out[o]) + corr

    @jit_with_bounds(THREADS, 1)
    def kernel(x, act_scale, rows, rscale, base_out, out, partials, counters, n_parts, a, b, hi_scale,
               lo_scale, k_chunk, k_last, batch, span, n_out, tile_rows, n_tiles, tiles_per_block, wc_n, ks_n,
               resid, has_resid, width, eps):
        """Correction of rows [t0 * tile_rows, t1 * tile_rows) of block (t0, t1 = its tiles) from the
        picks of chunks [y * span, (y + 1) * span), y = blockIdx.y.

        Layout: x fp16 [in] (rms_norm: float32 [in]; an activation: gate_up fp16 [2 in]), act_scale f32 [in]
        (rms_norm: times the norm's weight), rows uint32 [in, stride / 4] (mapped host or device),
        rscale fp16 [out]; out / base_out [out]; partials flat f32 [n_parts * out], counters i32 [tiles];
        merged, whichever block completes a tile adds resid f32 [out] to it when `has_resid` (the base
        GEMV's folded residual add).
        Launch: grid (blocks, chunk groups), block `threads` (plan_correction); thread (ks, wc) =
        (tid // wc_n, tid % wc_n) owns word column wc (8 outputs) of each pass and picks ks, ks + ks_n,
        ... in groups of UNROLL loads in flight. Every block selects its group's chunks itself
        (`select_chunks`, up to 4 chunks per pass sharing their barriers; x from L2), then streams all
        of the pass's picks at once. Merged, each chunk group is one part of the split output (the last
        gridDim.y parts), so a wide input's selection passes run side by side, not one after another.
        Bytes: per block, 4 B of each chosen row's slice it owns over PCIe (all blocks together: each
        chosen row once), x and act_scale once per block from L2, 2 B scale + 4-8 B out per row.
        """
        hist = cuda.shared.array(HIST_SIZE, int32)
        cuts = cuda.shared.array(CUTS_SIZE, int32)
        scan = cuda.shared.array(SCAN_SIZE, int32)
        group_sums = cuda.shared.array(GROUP_SIZE, int32)
        x_stash = cuda.shared.array(STASH_SIZE, float32)
        sel_idx = cuda.shared.array(SEL_CAP, int32)
        sel_x = cuda.shared.array(RED_SIZE, float32)  # the picks' x~; after the last pass, the reduction
        flags = cuda.shared.array(FLAG_CAP, int32)
        red = cuda.shared.array(WARPS_MAX, float32)  # rms_norm: the block's square sum
        scratch = cuda.shared.array(SCRATCH, float32)
        if PDL:
            wait_upstream()
            release_dependents()
        tid = cuda.threadIdx.x
        nthr = cuda.blockDim.x
        inv_rms = float32(1)
        if NORM:  # every block its own 1 / rms(x), as the GEMV's blocks do (x from L2)
            ss = float32(0)
            for i in range(tid, width, nthr):
                ss += x[i] * x[i]
            inv_rms = float32(1) / math.sqrt(block_sum(ss, red, scratch) / float32(width) + eps)
        t0 = cuda.blockIdx.x * tiles_per_block
        t1 = min(t0 + tiles_per_block, n_tiles)
        if t0 >= t1:
            return
        o_hi = min(t1 * tile_rows, n_out)
        part = n_parts - cuda.gridDim.y + cuda.blockIdx.y
        c_begin = cuda.blockIdx.y * span
        w_lo = t0 * tile_rows // 8
        w_hi = (o_hi + 7) // 8
        n_chunks = (width + MAX_CHUNK - 1) // MAX_CHUNK
        c_end = min(c_begin + span, n_chunks)
        ks = tid // wc_n
        wc = tid % wc_n
        acc = cuda.local.array(8, float32)
        wv = cuda.local.array(UNROLL, uint32)
        xu = cuda.local.array(UNROLL, float32)
        wp = w_lo  # (while loops: a range with a run-time step costs a 64-bit division)
        while wp < w_hi:
            w = wp + wc
            mine = ks < ks_n and w < w_hi
            for j in range(8):
                acc[j] = float32(0)
            X = float32(0)  # sum of the chosen x~ this thread saw: folds the 1 + code/16 offset
            c0 = c_begin
            while c0 < c_end and k_chunk > 0:
                nb = min(batch, c_end - c0)
                select_chunks(x, act_scale, MODE, inv_rms, width, MAX_CHUNK, c0, nb, k_chunk, k_last, a, b,
                              hi_scale, lo_scale, hist, cuts, scan, group_sums, x_stash, sel_idx, sel_x)
                n_sel = (nb - 1) * k_chunk + (k_last if c0 + nb == n_chunks else k_chunk)
                s0 = ks * UNROLL
                while mine and s0 < n_sel:
                    for m in range(UNROLL):  # issue every load before the first use
                        s = s0 + m
                        if s < n_sel:  # unsigned indices: no negative-index wraparound
                            wv[m] = rows[uint64(sel_idx[s]), uint64(w)]
                            xu[m] = sel_x[s]
                        else:
                            wv[m] = uint32(0)
                            xu[m] = float32(0)
                    for m in range(UNROLL):
                        X += xu[m]
                        for j in range(8):
                            acc[j] += nib_float(wv[m], j) * xu[m]
                    s0 += ks_n * UNROLL
                cuda.syncthreads()  # sel_idx / sel_x are rewritten by the next pass
                c0 += batch
            red = sel_x
            # sum_s (code - 8) x_s = 16 sum_s f x_s - 24 sum_s x_s, with f = 1 + code / 16
            if ks_n == 1:
                if mine:
                    for j in range(8):
                        emit(8 * w + j, float32(16) * acc[j] - float32(24) * X, o_hi, rscale, base_out, out,
                             partials, part, n_out)
            else:
                if mine:
                    for j in range(8):
                        red[(ks * 8 + j) * wc_n + wc] = float32(16) * acc[j] - float32(24) * X
                cuda.syncthreads()
                e = tid
                while e < wc_n * 8:
                    j = e // wc_n
                    c = e % wc_n
                    # the ks_n groups' values, 4 loads in flight; a fixed order: deterministic
                    stride = 8 * wc_n
                    at = j * wc_n + c
                    s0 = s1 = s2 = s3 = float32(0)
                    k = 0
                    while k + 4 <= ks_n:
                        s0 += red[at]
                        s1 += red[at + stride]
                        s2 += red[at + 2 * stride]
                        s3 += red[at + 3 * stride]
                        at += 4 * stride
                        k += 4
                    while k < ks_n:
                        s0 += red[at]
                        at += stride
                        k += 1
                    total = (s0 + s1) + (s2 + s3)
                    if wp + c < w_hi:
                        emit(8 * (wp + c) + j, total, o_hi, rscale, base_out, out, partials, part, n_out)
                    e += nthr
                cuda.syncthreads()
            wp += wc_n
        if merge:
            arrive_tiles(partials, counters, out, n_out, n_parts, tile_rows, t0, t1 - t0, flags, resid, has_resid)

    return kernel


@functools.lru_cache(maxsize=None)
def _ones(width: int):
    """A device act_scale of ones, for callers whose x is already x~."""
    return cuda.to_device(np.ones(width, np.float32))


def _row_words(rows):
    """The residual table as uint32 [in, stride / 4] (rows: uint8 [in, stride], stride % 4 == 0)."""
    if rows.dtype == np.uint32:
        return rows
    if rows.shape[1] % 4:
        raise ValueError(f"residual row stride {rows.shape[1]} bytes: must be a multiple of 4 (see ops.dma.pad_rows)")
    n, stride = rows.shape
    return rows.reshape(n * stride).view(np.uint32).reshape(n, stride // 4)


class Correction:
    """A prepared correction of one linear group: table, scales, bounds, k_chunk and plan; call per token.

    residual_rows: uint8 [in, stride] device array, stride >= ceil(out / 2) and a multiple of 4
    (`ops.dma.PinnedTable.device_array()` for zero-copy, or a device copy of `ops.dma.pad_rows(table)`);
    residual_scales: fp16 [out] device array. Launch on a high-priority stream (see the module notes).
    """

    def __init__(self, residual_rows, residual_scales, bounds: BucketBounds, k_chunk: int, *, n_tb: int = 8,
                 tile_rows: int = TILE_ROWS):
        self.rows = _row_words(residual_rows)
        self.rscale = residual_scales
        self.out_features = residual_scales.shape[0]
        if self.rows.shape[1] * WORD_OUTPUTS < self.out_features:
            raise ValueError(f"residual rows hold {self.rows.shape[1] * WORD_OUTPUTS} outputs, "
                             f"scales {self.out_features}")
        self.k_chunk = k_chunk
        self.k_last = chunk_ks(self.rows.shape[0], k_chunk)[-1]  # validates k_chunk; picks of the last chunk
        self.bounds = tuple(np.float32(v) for v in (bounds.a, bounds.b, bounds.hi_scale, bounds.lo_scale))
        self.plan = plan_correction(self.out_features, n_tb, tile_rows)
        n_chunks = -(-self.rows.shape[0] // MAX_CHUNK)
        # merged parts: one per selection pass, so that the passes of a wide input run in parallel
        self.parts = -(-n_chunks // pass_chunks(k_chunk))

    @property
    def blocks(self) -> int:
        """Thread blocks of a merged launch (each fills an SM's register file: `BaseGemv.beside`)."""
        return self.plan.blocks * self.parts

    def __call__(self, x, act_scale=None, *, base_out=None, out=None, merge: SplitOutput | None = None,
                 resid=None, prologue: str = "fp16", eps: float = 0.0, stream=0) -> None:
        """Launch on `stream`. With `merge`: add into the base GEMV's split output (concurrently with it;
        `resid`: the GEMV's folded residual, added by whichever kernel completes a tile); else out =
        base_out + correction (out defaults to base_out, in place). `prologue`, `act_scale`, `eps`: x~
        made from x as the base GEMV's prologue makes it (`BaseGemv.__call__`)."""
        p = self.plan
        width = self.rows.shape[0]  # inputs: the residual table's rows
        check_prologue_input(x, prologue, width)
        if act_scale is None:
            act_scale = _ones(width)
        if merge is not None:
            if (merge.tile_rows != p.tile_rows or merge.n_out != self.out_features
                    or merge.n_parts != merge.k_blocks + self.parts):
                raise ValueError("merge scratch and correction disagree on tile rows, outputs or parts "
                                 f"(the correction writes {self.parts}: split_output(extra_parts=corr.parts))")
            kernel, base_out, partials, counters, n_parts = (
                _correction_kernel(True, prologue), dummy_array(np.float16), merge.partials, merge.counters, merge.n_parts)
            groups, span = self.parts, pass_chunks(self.k_chunk)
        else:
            if base_out is None:
                raise ValueError("give base_out (stand-alone) or merge (fused with the base GEMV)")
            if resid is not None:
                raise ValueError("resid is the merged GEMV's folded residual add: give merge, or add it to base_out")
            out = base_out if out is None else out
            kernel, partials, counters, n_parts = (_correction_kernel(False, prologue), dummy_array(np.float32),
                                                   dummy_array(np.int32), 1)
            groups, span = 1, self.parts * pass_chunks(self.k_chunk)  # one writer per output: every chunk
        a, b, hi_scale, lo_scale = self.bounds
        kernel[(p.blocks, groups), p.threads, stream](
            x, act_scale, self.rows, self.rscale, base_out, out, partials, counters, n_parts,
            a, b, hi_scale, lo_scale, self.k_chunk, self.k_last,
            pass_chunks(self.k_chunk), span, self.out_features, p.tile_rows, p.n_tiles, p.tiles_per_block, p.wc_n, p.ks_n,
            dummy_array(np.float32) if resid is None else resid, resid is not None, width, np.float32(eps))


def correction_cuda(x, base_out, residual_rows, residual_scales, bounds: BucketBounds, k_chunk: int,
                    act_scale=None, *, out=None, n_tb: int = 8, tile_rows: int = TILE_ROWS,
                    merge: SplitOutput | None = None, stream=0) -> None:
    """One-shot GPU `correction_reference` (x: the GEMV's fp16 input; x~ = x * act_scale)."""
    Correction(residual_rows, residual_scales, bounds, k_chunk, n_tb=n_tb, tile_rows=tile_rows)(
        x, act_scale, base_out=base_out, out=out, merge=merge, stream=stream)
