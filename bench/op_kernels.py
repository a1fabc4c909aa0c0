"""The selector and DMA as stand-alone launches, for comparison and for testing the device functions on
real shapes. The product fuses both into the correction kernel (`ops.correction`); nothing in it imports
this file.

- `select_bucket_cuda`: `ops.selector_cuda.select_chunks` in a kernel of one block per chunk that lists the
  picks in the CPU reference's (bucket, index) order, `ops.selector.select_bucket` on the GPU.
- `fetch_rows_cuda`: a plain zero-copy gather of chosen rows from a (mapped) residual table, against
  `fetch_rows_reference` (NumPy).
- `copy_rows_memcpy`: the other way to fetch rows, one `cudaMemcpyAsync` per chosen row into device memory;
  it needs the indices on the host, so a GPU-made selection costs a device-to-host sync first.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float32, int32

from decdec.constants import CHUNK_SIZE, chunk_ks, n_selected
from decdec.ops.dma import PinnedTable, _check, _runtime  # the product's cuda-python access and errors
from decdec.ops.selector import BucketBounds
from decdec.ops.selector_cuda import (CHUNK_THREADS, CUTS_SIZE, GROUP_SIZE, HIST_SIZE, MAX_CHUNK, PASS_CHUNKS,
                                      SCAN_SIZE, STASH_SIZE, XT_RAW, XT_SCALED, bucket_of,
                                      select_chunks)

FETCH_THREADS = 256

__all__ = ["select_bucket_cuda", "fetch_rows_reference", "fetch_rows_cuda", "copy_rows_memcpy", "stream_handle",
           "pcie_bytes"]


def pcie_bytes(out_f: int, in_f: int, k_chunk: int) -> int:
    """Bytes one step's fetch of picked residual rows reads over PCIe for an (out, in) group."""
    return n_selected(in_f, k_chunk) * -(-out_f // 2)


# ----------------------------------------------------------------------------------------------------
# selector


@cuda.jit
def _select_kernel(x, act_scale, has_scale, k_chunk, k_last, chunk, a, b, hi_scale, lo_scale, out_idx, out_x):
    """One block per (chunk, row) of x [rows, width]; out_idx / out_x [rows, n_selected] in FORMATS order.

    Launch: grid (n_chunks, rows), block CHUNK_THREADS. Bytes: reads x (and act_scale) of the chunk,
    writes 8 B per pick. After `select_chunks` (index order), each pick's slot in (bucket, index) order
    is the picks of lower buckets plus the earlier picks of its own bucket (O(k^2) compares: a tool and
    test path; the fused correction needs only the set).
    """
    hist = cuda.shared.array(HIST_SIZE, int32)
    cuts = cuda.shared.array(CUTS_SIZE, int32)
    scan = cuda.shared.array(SCAN_SIZE, int32)
    group_sums = cuda.shared.array(GROUP_SIZE, int32)
    x_stash = cuda.shared.array(STASH_SIZE, float32)
    sel_idx = cuda.shared.array(MAX_CHUNK, int32)
    sel_x = cuda.shared.array(MAX_CHUNK, float32)
    sel_b = cuda.shared.array(MAX_CHUNK, int32)
    c = cuda.blockIdx.x
    row = cuda.blockIdx.y
    xr = x[row]
    start = c * chunk
    k = k_chunk if start + chunk <= xr.shape[0] else k_last
    select_chunks(xr, act_scale, XT_SCALED if has_scale else XT_RAW, float32(1), xr.shape[0], chunk, c, 1, k_chunk,
                  k_last, a, b, hi_scale, lo_scale, hist, cuts, scan, group_sums, x_stash, sel_idx, sel_x)
    cut = cuts[0]
    need = cuts[PASS_CHUNKS]
    for p in range(cuda.threadIdx.x, k, cuda.blockDim.x):
        sel_b[p] = bucket_of(abs(sel_x[p]), a, b, hi_scale, lo_scale)  # x~ in float32: the same bucket
    cuda.syncthreads()
    for p in range(cuda.threadIdx.x, k, cuda.blockDim.x):
        bp = sel_b[p]
        slot = 0
        for u in range(bp):  # picks of lower buckets: all of them above the cut
            slot += hist[u] if u < cut else need
        for s in range(p):
            if sel_b[s] == bp:
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
    _select_kernel[grid, CHUNK_THREADS, stream](
        x, scale, has_scale, k_chunk, ks[-1], chunk_size,
        np.float32(bounds.a), np.float32(bounds.b), np.float32(bounds.hi_scale), np.float32(bounds.lo_scale),
        out, out_x)


# ----------------------------------------------------------------------------------------------------
# DMA: zero-copy gather and the memcpy path


def fetch_rows_reference(table_np: np.ndarray, idx) -> np.ndarray:
    """The chosen rows, in the order of idx: table_np[idx]."""
    return table_np[np.asarray(idx, dtype=np.int64)]


@cuda.jit
def _fetch_kernel(table, idx, out):
    """out[r, :] = table[idx[r], :] for uint32 words; table may be mapped host memory.

    Launch: grid (len(idx),), block 256: one block per row, consecutive threads read consecutive
    words (one 128-byte PCIe read per warp-load). Bytes: k rows over PCIe in, k rows to HBM out.
    """
    r = cuda.blockIdx.x
    src = idx[r]
    for w in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
        out[r, w] = table[src, w]


def fetch_rows_cuda(table, idx, *, out, stream=0) -> None:
    """GPU `fetch_rows_reference`: table [rows, stride bytes] (device or mapped, any dtype), idx int32 [k]
    -> out [k, stride bytes]. The row stride must be a multiple of 4 bytes (PinnedTable's are of 16)."""
    k = idx.shape[0]
    if k == 0:
        return
    _fetch_kernel[k, FETCH_THREADS, stream](_as_words(table), idx, _as_words(out))


def _as_words(a):
    """A contiguous [rows, n] device array of any dtype viewed as uint32 [rows, row bytes / 4]."""
    row_bytes = a.shape[1] * a.dtype.itemsize
    if row_bytes % 4:
        raise ValueError(f"row stride {row_bytes} bytes: must be a multiple of 4 for 32-bit loads")
    if a.dtype == np.uint32:
        return a
    return a.reshape(a.shape[0] * a.shape[1]).view(np.uint32).reshape(a.shape[0], row_bytes // 4)


def stream_handle(stream) -> int:
    """The raw cudaStream_t of a Numba stream, a torch stream, an int, or None / 0 (the default stream)."""
    if stream is None or isinstance(stream, int):
        return int(stream or 0)
    if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
        return int(stream.cuda_stream)
    handle = getattr(stream, "handle", stream)  # a Numba stream wraps its handle
    value = getattr(handle, "value", handle)  # ctypes c_void_p keeps the pointer in .value (None = 0)
    return int(value or 0)


def copy_rows_memcpy(table: PinnedTable, idx, dst, stream=0, scatter: bool = False) -> None:
    """Row idx[r] of the pinned table -> row r of dst (device uint8 [k, stride]), or row idx[r] of dst
    (uint8 [n_rows, stride]) with `scatter`; one cudaMemcpyAsync per row on `stream`. idx must be on
    the host."""
    rt = _runtime()
    dst_ptr = dst.__cuda_array_interface__["data"][0]
    s = rt.cudaStream_t(stream_handle(stream))
    for r, i in enumerate(np.asarray(idx, dtype=np.int64).reshape(-1)):
        at = int(i) if scatter else r
        err, = rt.cudaMemcpyAsync(dst_ptr + at * table.stride, table.ptr + int(i) * table.stride, table.stride,
                                  rt.cudaMemcpyKind.cudaMemcpyHostToDevice, s)
        _check(rt, err, f"cudaMemcpyAsync of residual row {int(i)}")
