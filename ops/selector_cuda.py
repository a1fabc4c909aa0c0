"""Selector op on the GPU: the bucket top-k of `ops.selector.select_bucket`, chosen identically.

The CPU reference is `ops.selector.select_bucket`; per chunk of 1024 channels it takes the `k_c` channels
of smallest `(bucket, index)` (docs/FORMATS.md, "Selection"). `select_chunks` is a block-wide device
function that makes exactly that choice for up to 16 chunks at once, so the fused correction kernel
(`ops.correction`) selects with the very code tested here; `select_bucket_cuda` wraps it in a kernel of
one block per chunk that also lists the picks in the reference's (bucket, index) order.

How one block chooses, deterministically (the reference kernel keeps whichever channels of the cut
bucket its atomics reach first; ours takes the lowest indices, like the CPU rule):
1. bucket of every channel (float32, NaN / inf safe), histogram per chunk by shared-memory atomics
   (counts do not depend on the order the atomics land in);
2. the cut bucket of each chunk: the bucket where the running count first reaches k_c, and how many
   of it are still needed (one thread per (chunk, bucket) sums the histogram below it);
3. every channel above the cut is taken, and the first `need` channels of the cut bucket: one
   block-wide prefix scan, segmented per chunk, of the packed pair (#above-cut, #at-cut) over the
   threads' contiguous runs of channels gives each channel its slot, below + min(at, need).
All chunks of a pass share the barriers (~15 per pass), so latency does not grow with the width.
No warp intrinsics are used, so the CUDA simulator runs the same code as the GPU.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float32, int8, int32, uint64

from ops.selector import CHUNK_SIZE, N_BUCKETS, BucketBounds, chunk_ks

__all__ = ["select_bucket_cuda", "select_chunks", "bucket_of", "pass_chunks", "MAX_CHUNK", "PASS_CHUNKS",
           "SEL_CAP", "BK_SIZE", "HIST_SIZE", "CUTS_SIZE", "SCAN_SIZE"]

MAX_CHUNK = 1024  # shared arrays are laid out per 1024 channels; smaller chunks work too
PASS_CHUNKS = 16  # chunks one pass selects at once: 16 KiB of int8 buckets in shared memory
SEL_CAP = 2048  # picks one pass may hold (8 B each in shared memory); fewer chunks per pass if k is large
BK_STRIDE = MAX_CHUNK + MAX_CHUNK // 8  # a chunk's buckets, 4 pad bytes after every 32 (see _slot)
BK_SIZE = PASS_CHUNKS * BK_STRIDE  # shared sizes must be literal constants for Numba
HIST_SIZE = PASS_CHUNKS * N_BUCKETS
CUTS_SIZE = 2 * PASS_CHUNKS  # cut bucket of each chunk, then how many of it are taken
SCAN_SIZE = 512  # one slot per thread (blocks of up to 512 threads)
SELECT_THREADS = 256  # block of the stand-alone kernel: 4 channels per thread for a full chunk
COMMON_FIRST = 24  # buckets 24..31 are counted in a register first (see select_chunks)


def pass_chunks(k_chunk: int) -> int:
    """Chunks one `select_chunks` pass may take: all picks must fit SEL_CAP slots."""
    return max(1, min(PASS_CHUNKS, SEL_CAP // max(k_chunk, 1)))


@cuda.jit(device=True)
def bucket_of(v, a, b, hi_scale, lo_scale):
    """Bucket (0 = largest) of v = |x~| in float32, as `ops.selector.bucket_ids`: NaN -> 31, inf -> 0.

    Clamping happens in float before any float->int conversion, so NaN and inf never reach one.
    """
    if v != v:
        return N_BUCKETS - 1
    if v >= a:
        return 0
    if v >= b:
        t = (a - v) * hi_scale  # the reference's float32 product; NaN (inf * 0) maps to 14
        if t != t or t >= float32(14):
            return 15
        return 1 if t < float32(1) else 1 + int32(t)
    t = (b - v) * lo_scale
    if t != t or t >= float32(15):
        return N_BUCKETS - 1
    return 16 if t < float32(1) else 16 + int32(t)


@cuda.jit(device=True)
def _slot(i):
    """Byte of channel i in a chunk's bucket array: 4 pad bytes after every 32, so threads reading
    their own runs of 32 consecutive channels hit 32 different banks (9 words apart)."""
    return i + (i >> 5) * 4


@cuda.jit(device=True)
def _xt(x, act_scale, has_scale, i):
    """x~ = x * act_scale in float32, exactly as the GEMV stages it."""
    v = float32(x[i])
    if has_scale:
        v = v * float32(act_scale[i])
    return v


@cuda.jit(device=True)
def select_chunks(x, act_scale, has_scale, chunk, c0, nb, k_chunk, a, b, hi_scale, lo_scale,
                  bk, hist, cuts, scan, sel_idx, sel_x):
    """Block-wide: the picks of chunks c0 .. c0 + nb - 1 (nb <= 16, chunk <= 1024) of x [width].

    Every thread of the block must call it (it synchronises). On return, chunk c0 + q's k_q picks are
    sel_idx[q * k_chunk : q * k_chunk + k_q] (global channel indices, ascending) with their x~ in
    sel_x; nb * k_chunk <= len(sel_idx) is the caller's to ensure (`pass_chunks`).
    Needs a block of 8 nb to 512 threads. Shared scratch: bk int8[18432], hist i32[512], cuts i32[32],
    scan i32[512]. Step 1 walks channels interleaved over the threads (coalesced loads); steps 3-4 walk
    each thread's contiguous run (the scan needs index order), conflict-free through `_slot`.
    Cost: reads each channel's x (and act_scale) twice from L1/L2; ~2 log2(1024 nb / threads) + 5 barriers.
    """
    tid = cuda.threadIdx.x
    nthr = cuda.blockDim.x
    width = x.shape[0]
    tpc = 1  # threads per chunk: a power of two, each owning a contiguous run of `run` channels
    while tpc * 2 <= nthr // nb and tpc * 2 <= MAX_CHUNK:
        tpc *= 2
    run = MAX_CHUNK // tpc
    q = tid // tpc
    j = tid % tpc
    start = (c0 + q) * chunk
    wc = min(chunk, width - start) if q < nb else 0  # channels of this thread's chunk
    first = j * run
    for e in range(tid, nb * N_BUCKETS, nthr):
        hist[e] = 0
    if tid < nb:
        cuts[tid] = -1  # no cut: nothing taken (k_c = 0)
        cuts[PASS_CHUNKS + tid] = 0
    cuda.syncthreads()
    # 1. buckets and per-chunk histograms. Most channels fall in the last few buckets (|x| far below
    # b), and shared atomics on one address serialise, so buckets 24..31 are counted in one packed
    # register (8 bits each; a thread sees <= 128 channels) flushed once per thread, and only the rare
    # upper buckets take an atomic per channel. Counts are order-free either way.
    common = uint64(0)
    for r in range(run):  # channels interleaved over the chunk's threads: coalesced loads
        i = r * tpc + j
        if i < wc:
            bkt = bucket_of(abs(_xt(x, act_scale, has_scale, start + i)), a, b, hi_scale, lo_scale)
            bk[q * BK_STRIDE + _slot(i)] = bkt
            if bkt >= COMMON_FIRST:
                common += uint64(1) << uint64(8 * (bkt - COMMON_FIRST))
            else:
                cuda.atomic.add(hist, q * N_BUCKETS + bkt, 1)
    if q < nb:
        for f in range(N_BUCKETS - COMMON_FIRST):
            n = int32((common >> uint64(8 * f)) & uint64(0xFF))
            if n > 0:
                cuda.atomic.add(hist, q * N_BUCKETS + COMMON_FIRST + f, n)
    cuda.syncthreads()
    # 2. cut bucket of each chunk: thread (chunk, bucket) checks whether the running count crosses k_c there
    if tid < nb * N_BUCKETS:
        qc = tid // N_BUCKETS
        bb = tid % N_BUCKETS
        cstart = (c0 + qc) * chunk
        if cstart < width:
            kc = k_chunk * min(chunk, width - cstart) // chunk
            below = 0
            for u in range(bb):
                below += hist[qc * N_BUCKETS + u]
            if 0 < kc and below < kc and kc <= below + hist[qc * N_BUCKETS + bb]:
                cuts[qc] = bb
                cuts[PASS_CHUNKS + qc] = kc - below
    cuda.syncthreads()
    # 3. (#above the cut, #at the cut) of each thread's run, packed in one int32, scanned per chunk
    cut = cuts[q] if q < nb else -1
    mine = 0
    for r in range(run):
        i = first + r
        if i < wc:
            bkt = bk[q * BK_STRIDE + _slot(i)]
            if bkt < cut:
                mine += 1
            elif bkt == cut:
                mine += 1 << 16  # counts stay below 2**16 (<= 1024 channels a chunk)
    scan[tid] = mine
    cuda.syncthreads()
    d = 1
    while d < tpc:  # Hillis-Steele, segmented: partner tid - d is in the same chunk iff j >= d
        partner = scan[tid - d] if j >= d else 0
        cuda.syncthreads()
        scan[tid] += partner
        cuda.syncthreads()
        d *= 2
    # 4. slots: the k-th taken channel (by index) goes to slot k of its chunk
    before = scan[tid] - mine
    above = before & 0xFFFF
    at = before >> 16
    need = cuts[PASS_CHUNKS + q] if q < nb else 0
    for r in range(run):
        i = first + r
        if i < wc:
            bkt = bk[q * BK_STRIDE + _slot(i)]
            if bkt < cut or (bkt == cut and at < need):
                slot = q * k_chunk + above + min(at, need)
                sel_idx[slot] = start + i
                sel_x[slot] = _xt(x, act_scale, has_scale, start + i)
            if bkt < cut:
                above += 1
            elif bkt == cut:
                at += 1
    cuda.syncthreads()


@cuda.jit
def _select_kernel(x, act_scale, has_scale, k_chunk, chunk, a, b, hi_scale, lo_scale, out_idx, out_x):
    """One block per (chunk, row) of x [rows, width]; out_idx / out_x [rows, n_selected] in FORMATS order.

    Launch: grid (n_chunks, rows), block SELECT_THREADS. Bytes: reads x (and act_scale) of the chunk,
    writes 8 B per pick. After `select_chunks` (index order), each pick's slot in (bucket, index) order
    is the picks of lower buckets plus the earlier picks of its own bucket (O(k^2) compares: a tool and
    test path; the fused correction needs only the set).
    """
    bk = cuda.shared.array(BK_SIZE, int8)
    hist = cuda.shared.array(HIST_SIZE, int32)
    cuts = cuda.shared.array(CUTS_SIZE, int32)
    scan = cuda.shared.array(SCAN_SIZE, int32)
    sel_idx = cuda.shared.array(MAX_CHUNK, int32)
    sel_x = cuda.shared.array(MAX_CHUNK, float32)
    c = cuda.blockIdx.x
    row = cuda.blockIdx.y
    xr = x[row]
    start = c * chunk
    k = k_chunk * min(chunk, xr.shape[0] - start) // chunk
    select_chunks(xr, act_scale, has_scale, chunk, c, 1, k_chunk, a, b, hi_scale, lo_scale,
                  bk, hist, cuts, scan, sel_idx, sel_x)
    cut = cuts[0]
    need = cuts[PASS_CHUNKS]
    for p in range(cuda.threadIdx.x, k, cuda.blockDim.x):
        bp = bk[_slot(sel_idx[p] - start)]
        slot = 0
        for u in range(bp):  # picks of lower buckets: all of them above the cut
            slot += hist[u] if u < cut else need
        for s in range(p):
            if bk[_slot(sel_idx[s] - start)] == bp:
                slot += 1
        out_idx[row, c * k_chunk + slot] = sel_idx[p]
        out_x[row, c * k_chunk + slot] = sel_x[p]


def select_bucket_cuda(x, k_chunk: int, bounds: BucketBounds, chunk_size: int = CHUNK_SIZE, *,
                       out, out_x=None, act_scale=None, stream=0) -> None:
    """GPU `select_bucket`: x [rows, width] or [width] (fp16/fp32 device array) -> out int32 [.., n_selected].

    With `act_scale` [width], selects on x * act_scale (float32), as the GEMV sees it; `out_x`
    (float32, same shape as out) receives the chosen x~ values if given.
    """
    if len(x.shape) == 1:
        x, out = x.reshape(1, x.shape[0]), out.reshape(1, out.shape[0])
        out_x = None if out_x is None else out_x.reshape(1, out_x.shape[0])
    rows, width = x.shape
    ks = chunk_ks(width, k_chunk, chunk_size)  # validates k_chunk
    if chunk_size > MAX_CHUNK:
        raise ValueError(f"chunk_size = {chunk_size}: the GPU selector supports chunks up to {MAX_CHUNK}")
    if tuple(out.shape) != (rows, sum(ks)):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(rows, sum(ks))}")
    if sum(ks) == 0:
        return
    if out_x is None:
        out_x = cuda.device_array(out.shape, np.float32, stream=stream)
    has_scale = act_scale is not None
    scale = act_scale if has_scale else cuda.device_array(1, np.float32, stream=stream)
    grid = ((width + chunk_size - 1) // chunk_size, rows)
    _select_kernel[grid, SELECT_THREADS, stream](
        x, scale, has_scale, k_chunk, chunk_size,
        np.float32(bounds.a), np.float32(bounds.b), np.float32(bounds.hi_scale), np.float32(bounds.lo_scale),
        out, out_x)
