"""Selector op on the GPU: the bucket top-k of `ops.selector.select_bucket`, chosen identically.

The CPU reference is `ops.selector.select_bucket`; per chunk of 1024 channels it takes the `k_c` channels
of smallest `(bucket, index)` (docs/FORMATS.md, "Selection"). `select_chunks` is a block-wide device
function that makes exactly that choice for up to 4 chunks at once, so the fused correction kernel
(`ops.correction`) selects with the very code tested here (bench/op_kernels.py wraps it in a stand-alone
kernel for the tests and the benchmarks).

How one block chooses, deterministically (the reference kernel keeps whichever channels of the cut
bucket its atomics reach first; ours takes the lowest indices, like the CPU rule). Thread j of a chunk
owns a contiguous run of up to RUN_MAX = 8 channels and keeps their buckets in registers:
1. bucket of each of its channels (float32, branch-free, NaN / inf safe; all loads issued first),
   then a histogram per chunk by shared-memory atomics (counts do not depend on the order the atomics
   land in; the common low buckets are counted in one register first);
2. the cut bucket of each chunk: the bucket where the running count first reaches k_c, and how many
   of it are still needed (one thread per (chunk, bucket) sums the histogram below it);
3. every channel above the cut is taken, and the first `need` channels of the cut bucket: a two-level
   prefix sum, per chunk, of the packed pair (#above-cut, #at-cut) of the threads' runs (groups of 8
   threads by integer atomics, then the group sums) gives each channel its slot, below + min(at, need).
Five barriers per pass, shared by all its chunks (up to 4), so latency grows little with the width.
At k_chunk 1 (the least compensation, and the cheapest plan a tuner can choose) steps 2-3 reduce to
one shared-memory atomic min per thread over the keys bucket * 1024 + index: three barriers, no
histogram, no scan, as that plan's correction must finish beside the shortest GEMVs.
Arithmetic is int32 where Numba would widen to int64, indices unsigned where it would add a
negative-index check: the selection is instruction-bound, as every correction block selects every
chunk. No warp intrinsics are used, so the CUDA simulator runs the same code as the GPU.
"""

from __future__ import annotations

from numba import cuda, float32, int32, uint32, uint64

from decdec.constants import N_BUCKETS, PASS_CHUNKS
from decdec.ops.act import act_value


MAX_CHUNK = 1024  # shared arrays are laid out per 1024 channels; smaller chunks work too
RUN_MAX = 8  # channels one thread owns at most (their buckets live in registers; 16 spill in the correction)
CHUNK_THREADS = MAX_CHUNK // RUN_MAX  # threads per chunk: 128, four whole warps
PACKED_WORDS = RUN_MAX // 4  # a run's buckets, 8 bits each, in 2 registers
GROUP = 8  # threads whose runs the scan's first level sums
CHUNK_GROUPS = CHUNK_THREADS // GROUP  # scan groups a chunk has: 16
SEL_CAP = 2048  # picks one pass may hold (8 B each in shared memory); fewer chunks per pass if k is large
HIST_SIZE = PASS_CHUNKS * N_BUCKETS  # shared sizes must be literal constants for Numba
CUTS_SIZE = 2 * PASS_CHUNKS  # cut bucket of each chunk, then how many of it are taken
SCAN_SIZE = 512  # one slot per thread (blocks of up to 512 threads)
GROUP_SIZE = SCAN_SIZE // GROUP  # one sum per group of 8 threads
STASH_SIZE = PASS_CHUNKS * MAX_CHUNK  # the pass's x~, float32 (16 KiB)
COMMON_FIRST = 24  # buckets 24..31 are counted in a register first (see select_chunks)
KEY_SHIFT = 10  # a pick's key is bucket << KEY_SHIFT | index (MAX_CHUNK = 1 << KEY_SHIFT): its order is (bucket, index)
NO_KEY = 1 << 30  # above every key (< 2^15)


def pass_chunks(k_chunk: int) -> int:
    """Chunks one `select_chunks` pass of a 512-thread block may take: all picks must fit SEL_CAP slots."""
    return max(1, min(PASS_CHUNKS, SEL_CAP // max(k_chunk, 1)))


@cuda.jit(device=True)
def bucket_of(v, a, b, hi_scale, lo_scale):
    """Bucket (0 = largest) of v = |x~| in float32, as `ops.selector.bucket_ids`: NaN -> 31, inf -> 0.

    Branch-free (both scaled distances are computed, then selected). Each is clamped in float before
    the float->int conversion, so NaN and inf never reach one: a NaN distance (NaN v, or inf * 0) fails
    `t < cap` and becomes the cap, as the reference's nan_to_num; NaN v ends in the last bucket.
    """
    th = (a - v) * hi_scale
    th = th if th < float32(14) else float32(14)
    th = th if th > float32(0) else float32(0)
    tl = (b - v) * lo_scale
    tl = tl if tl < float32(15) else float32(15)
    tl = tl if tl > float32(0) else float32(0)
    hi = 1 + int32(th)
    lo = 16 + int32(tl)
    mid = hi if v >= b else lo
    return 0 if v >= a else mid


# What x~ is made of (`_xt`, the GEMV's prologue: ops.base_gemv.PROLOGUES): x itself; x * act_scale;
# x * act_scale * inv_rms, an rms_norm folded in (x its float32 input, its weight in act_scale,
# inv_rms = 1 / rms(x)); act(x[i]) * x[width + i] * act_scale[i], act x up folded in (x = gate_up).
XT_RAW, XT_SCALED, XT_NORM, XT_SILU, XT_GELU = range(5)
XT_OF_PROLOGUE = {"fp16": XT_SCALED, "rms_norm": XT_NORM, "silu": XT_SILU, "gelu_tanh": XT_GELU}


@cuda.jit(device=True)
def _xt(x, act_scale, mode, inv_rms, width, i):
    """x~[i] in float32, exactly as the GEMV stages it (`mode`: XT_*)."""
    u = uint64(i)  # i >= 0: an unsigned index needs no negative-index wraparound (two selects a load)
    v = float32(x[u])
    if mode == XT_SILU or mode == XT_GELU:
        v = act_value(v, mode == XT_GELU) * float32(x[u + uint64(width)])
    if mode != XT_RAW:
        v = v * float32(act_scale[u])
    if mode == XT_NORM:
        v = v * inv_rms
    return v


@cuda.jit(device=True)
def _bucket_at(packed, r):
    """Bucket r of a run packed 4 to a word (r is a loop constant, so this is a shift and a mask)."""
    return int32((packed[r // 4] >> uint32(8 * (r % 4))) & uint32(0xFF))


@cuda.jit(device=True)
def _select_one(packed, q, nb, j, first, run, c0, chunk, width, k_last, best, cuts, x_stash, sel_idx, sel_x):
    """`select_chunks` at k_chunk 1, after its step 1: chunk q's pick is its channel of least key
    bucket << KEY_SHIFT | index, found by one atomic min per thread into best[q]; the thread whose run
    holds it writes it to slot q and, as the general path leaves them, the pick's bucket to cuts[q] and
    1 to cuts[PASS_CHUNKS + q] (a short last chunk's k_last of 0 keeps the caller's -1 and 0). best[q]
    was set to NO_KEY before the caller's barrier. Two barriers."""
    key = int32(NO_KEY)
    for r in range(RUN_MAX):
        bkt = _bucket_at(packed, r)  # N_BUCKETS past the chunk's end
        if bkt < N_BUCKETS:
            key = min(key, int32((bkt << KEY_SHIFT) | (first + r)))
    if key < NO_KEY:
        cuda.atomic.min(best, q, key)
    cuda.syncthreads()
    if q < nb:
        picks = int32(1) if (c0 + q + 1) * chunk <= width else k_last
        index = best[q] & int32(MAX_CHUNK - 1)  # (mask and shift: keys are >= 0, no sign fix-up)
        if picks > 0 and first <= index and index < first + run:  # this thread's run holds it
            sel_idx[q] = int32((c0 + q) * chunk + index)
            sel_x[q] = x_stash[uint32(q * MAX_CHUNK + (index - first) * CHUNK_THREADS + j)]  # its own write
            cuts[q] = best[q] >> int32(KEY_SHIFT)
            cuts[PASS_CHUNKS + q] = picks
    cuda.syncthreads()


@cuda.jit(device=True)
def select_chunks(x, act_scale, mode, inv_rms, width, chunk, c0, nb, k_chunk, k_last, a, b, hi_scale, lo_scale,
                  hist, cuts, scan, group_sums, x_stash, sel_idx, sel_x):
    """Block-wide: the picks of chunks c0 .. c0 + nb - 1 (nb <= 4, chunk <= 1024) of x~ [width] (`_xt`:
    x, act_scale, mode, inv_rms).

    Every thread of the block must call it (it synchronises). On return, chunk c0 + q's k_q picks are
    sel_idx[q * k_chunk : q * k_chunk + k_q] (global channel indices, ascending) with their x~ in
    sel_x; nb * k_chunk <= len(sel_idx) is the caller's to ensure (`pass_chunks`). k_last: the picks
    of x's last chunk (k_chunk, or fewer if it is partial: `ops.selector.chunk_ks`).
    Needs a block of 128 nb to 512 threads. Shared scratch: hist i32[128], cuts i32[8], scan i32[512],
    group_sums i32[64], x_stash f32[4096]. Thread j = tid % 128 of chunk q = tid // 128 owns channels
    [j run, (j + 1) run), run = ceil(chunk / 128) <= 8, and keeps their buckets in registers, their
    x~ in x_stash (for the picks). Cost per thread of a chunk: 8 loads of x (and act_scale) from
    L1/L2, all in flight at once; 5 barriers.
    """
    tid = int32(cuda.threadIdx.x)
    run = (chunk + CHUNK_THREADS - 1) // CHUNK_THREADS
    q = int32(tid // CHUNK_THREADS)  # whole warps per chunk: threads past the last chunk skip step 1 together
    j = int32(tid % CHUNK_THREADS)
    start = (c0 + q) * chunk
    wc = min(chunk, width - start) if q < nb else 0  # channels of this thread's chunk
    first = j * run
    if tid < nb * N_BUCKETS:  # (a block has 128 nb threads; a strided range would cost a division)
        hist[tid] = 0
    if tid < GROUP_SIZE:
        group_sums[tid] = NO_KEY if k_chunk == 1 else 0  # k_chunk 1: chunk q's least key (`_select_one`)
    if tid < nb:
        cuts[tid] = -1  # no cut: nothing taken (k_c = 0)
        cuts[PASS_CHUNKS + tid] = 0
    # 1. buckets of the run, N_BUCKETS past the chunk's end. Every load is issued before the first
    # use (indices clamped into x, no branch around them), so their latencies overlap.
    packed = cuda.local.array(PACKED_WORDS, uint32)  # the run's buckets, 8 bits each (registers)
    for w in range(PACKED_WORDS):
        packed[w] = uint32(N_BUCKETS * 0x01010101)
    if q < nb:
        xv = cuda.local.array(RUN_MAX, float32)
        for r in range(RUN_MAX):  # unconditional loads, all in flight (past the chunk: its last channel, unused)
            xv[r] = _xt(x, act_scale, mode, inv_rms, width, start + min(first + r, wc - 1))
        for r in range(RUN_MAX):  # interleaved by thread: no bank conflicts
            x_stash[q * MAX_CHUNK + r * CHUNK_THREADS + j] = xv[r]
        for w in range(PACKED_WORDS):
            word = uint32(0)
            for u in range(4):
                r = 4 * w + u
                bkt = bucket_of(abs(xv[r]), a, b, hi_scale, lo_scale)
                bkt = bkt if r < run and first + r < wc else N_BUCKETS
                word |= uint32(bkt) << uint32(8 * u)
            packed[w] = word
    cuda.syncthreads()  # hist zeroed
    if k_chunk == 1:
        _select_one(packed, q, nb, j, first, run, c0, chunk, width, k_last, group_sums, cuts, x_stash, sel_idx, sel_x)
        return
    # Most channels fall in the last few buckets (|x| far below b), and shared atomics on one address
    # serialise, so buckets 24..31 are counted in one packed register (8 bits each) flushed once, and
    # only the rare upper buckets take an atomic per channel.
    common = uint64(0)
    for r in range(RUN_MAX):
        bkt = _bucket_at(packed, r)
        if bkt < COMMON_FIRST:
            cuda.atomic.add(hist, q * N_BUCKETS + bkt, 1)
        elif bkt < N_BUCKETS:
            common += uint64(1) << uint64(8 * (bkt - COMMON_FIRST))
    if q < nb and common != 0:
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
            kc = k_chunk if cstart + chunk <= width else k_last
            below = int32(0)  # int32 throughout: Numba widens int32 sums to int64 (twice the instructions)
            for u in range(N_BUCKETS):  # unrolled: 32 independent loads, no latency carried from one to the next
                h = hist[qc * N_BUCKETS + u]
                below = int32(below + (h if u < bb else int32(0)))
            if 0 < kc and below < kc and kc <= below + hist[qc * N_BUCKETS + bb]:
                cuts[qc] = bb
                cuts[PASS_CHUNKS + qc] = kc - below
    cuda.syncthreads()
    # 3. (#above the cut, #at the cut) of each thread's run, packed in one int32 (counts < 2**16)
    cut = cuts[q] if q < nb else int32(-1)
    need = cuts[PASS_CHUNKS + q] if q < nb else int32(0)
    mine = int32(0)
    for r in range(RUN_MAX):
        bkt = _bucket_at(packed, r)
        mine = int32(mine + (int32(1) if bkt < cut else int32(0)) + (int32(1 << 16) if bkt == cut else int32(0)))
    scan[tid] = mine
    g = int32(tid // GROUP)  # this thread's group of 8; the group sums were zeroed with hist
    if mine != 0:
        cuda.atomic.add(group_sums, g, mine)  # integer sums: the order the atomics land in is irrelevant
    cuda.syncthreads()
    before = int32(0)  # the packed counts of the chunk's earlier runs: earlier groups', then this group's
    groups_before = int32(g - q * CHUNK_GROUPS)
    runs_before = int32(tid - g * GROUP)
    for u in range(CHUNK_GROUPS):  # unrolled, masked: independent loads
        v = group_sums[q * CHUNK_GROUPS + u]
        before = int32(before + (v if u < groups_before else int32(0)))
    for u in range(GROUP):
        v = scan[g * GROUP + u]
        before = int32(before + (v if u < runs_before else int32(0)))
    # 4. slots: the k-th taken channel (by index) goes to slot k of its chunk
    above = int32(before & 0xFFFF)
    at = int32(before >> 16)
    slot0 = int32(q * k_chunk)
    channel0 = int32(start + first)
    stash0 = int32(q * MAX_CHUNK + j)
    for r in range(RUN_MAX):
        bkt = _bucket_at(packed, r)
        if bkt < cut or (bkt == cut and at < need):
            slot = uint32(slot0 + above + min(at, need))  # unsigned: no negative-index wraparound
            sel_idx[slot] = int32(channel0 + r)
            sel_x[slot] = x_stash[uint32(stash0 + r * CHUNK_THREADS)]
        if bkt < cut:
            above = int32(above + 1)
        elif bkt == cut:
            at = int32(at + 1)
    cuda.syncthreads()
