"""DMA op: residual rows in pinned, device-mapped host memory, read by the kernels zero-copy.

DecDEC keeps each linear group's residual table (docs/FORMATS.md, "Residual table": row i = input
channel i, ceil(out / 2) bytes) in host memory and reads only the rows it picks, over PCIe, each step.
The table lives in `cudaHostAlloc(Mapped | Portable)` memory and kernels load it through its device
pointer: a warp's load of 128 contiguous bytes becomes one PCIe read, so the rows of many blocks stream
concurrently, and the picks never travel to the host (one memcpy per row would need them there first).
`PinnedTable.device_array()` hands the mapping to Numba kernels through `__cuda_array_interface__`; the
fused correction (`ops.correction`) is its reader.

Rows are stored with their stride padded to 16 bytes (`ROW_ALIGN`), so every row starts aligned for
wide loads; padding bytes hold 0x88 (residual code 0) and are never used.

Only `PinnedTable` needs a GPU; the layout helpers are plain NumPy.
"""

from __future__ import annotations

import ctypes
import weakref

import numpy as np
from numba import cuda

from decdec.errors import DeviceError

ROW_ALIGN = 16  # bytes: each row starts 16-byte aligned (uint32 / uint64 / 128-bit loads all line up)
PAD_BYTE = 0x88  # both nibbles = 8, i.e. residual code 0: harmless if a kernel ever reads padding


# ----------------------------------------------------------------------------------------------------
# layout (pure NumPy)


def padded_stride(row_bytes: int, align: int = ROW_ALIGN) -> int:
    """Bytes between consecutive rows: row_bytes rounded up to a multiple of align (at least align)."""
    return max(align, -(-row_bytes // align) * align)


def pad_rows(table: np.ndarray, align: int = ROW_ALIGN) -> np.ndarray:
    """uint8 [rows, row_bytes] -> uint8 [rows, padded_stride(row_bytes)], padding filled with 0x88."""
    table = np.ascontiguousarray(table, dtype=np.uint8)
    out = np.full((table.shape[0], padded_stride(table.shape[1], align)), PAD_BYTE, np.uint8)
    out[:, : table.shape[1]] = table
    return out


# ----------------------------------------------------------------------------------------------------
# pinned, device-mapped host memory through cuda-python


def _runtime():
    """cuda.bindings.runtime, or a DeviceError saying why it cannot be had."""
    try:
        from cuda.bindings import runtime
    except ImportError as e:  # pragma: no cover - depends on the install
        raise DeviceError(f"pinned host memory needs cuda-python (cuda.bindings): {e}") from e
    return runtime


def _check(rt, err, what: str) -> None:
    if err != rt.cudaError_t.cudaSuccess:
        _, msg = rt.cudaGetErrorString(err)
        raise DeviceError(f"{what}: {err.name} ({msg.decode() if isinstance(msg, bytes) else msg})")


class PinnedTable:
    """A residual table in pinned, device-mapped host memory: uint8 [n_rows, stride], stride 16-aligned.

    `host` is a NumPy view for filling it; `device_array(dtype)` the same bytes as a Numba device array
    (zero-copy: kernels read host memory over PCIe). Free with `close()` or a `with` block; a
    finalizer frees it too if neither runs.
    """

    def __init__(self, n_rows: int, row_bytes: int, align: int = ROW_ALIGN):
        self.n_rows, self.row_bytes = n_rows, row_bytes
        self.stride = padded_stride(row_bytes, align)
        self.nbytes = n_rows * self.stride
        what = (f"cannot allocate {self.nbytes} bytes of pinned, device-mapped host memory "
                f"({n_rows} rows x {self.stride} bytes) for a residual table")
        try:
            rt = _runtime()
        except DeviceError as e:
            raise DeviceError(f"{what}: {e}") from e
        flags = rt.cudaHostAllocMapped | rt.cudaHostAllocPortable  # mapped: device pointer; portable: any context
        err, ptr = rt.cudaHostAlloc(max(self.nbytes, 1), flags)
        _check(rt, err, what)
        self.ptr = int(ptr)
        self._finalizer = weakref.finalize(self, _free_host, self.ptr)
        err, dptr = rt.cudaHostGetDevicePointer(self.ptr, 0)
        if err != rt.cudaError_t.cudaSuccess:
            self.close()
            _check(rt, err, "cannot map pinned host memory into the device address space")
        self.device_ptr = int(dptr)
        buf = (ctypes.c_uint8 * max(self.nbytes, 1)).from_address(self.ptr)
        self.host = np.frombuffer(buf, np.uint8, self.nbytes).reshape(n_rows, self.stride)

    @classmethod
    def from_array(cls, table: np.ndarray, align: int = ROW_ALIGN) -> "PinnedTable":
        """Allocate and copy a uint8 [rows, row_bytes] table in (padding = 0x88)."""
        pinned = cls(*np.shape(table), align)
        pinned.host[:] = pad_rows(table, align)
        return pinned

    def device_array(self, dtype=np.uint8):
        """The mapped table as a Numba device array [n_rows, stride / itemsize] of dtype (no copy)."""
        if self.ptr is None:
            raise DeviceError("the pinned table was closed")
        dtype = np.dtype(dtype)
        if self.stride % dtype.itemsize:
            raise ValueError(f"stride {self.stride} is not a multiple of {dtype}'s {dtype.itemsize} bytes")
        interface = {"shape": (self.n_rows, self.stride // dtype.itemsize), "typestr": dtype.str,
                     "data": (self.device_ptr, False), "strides": None, "version": 3}
        return cuda.from_cuda_array_interface(interface, owner=self, sync=False)

    def close(self) -> None:
        """Free the pinned memory (idempotent). Kernels still reading it must have finished."""
        if getattr(self, "ptr", None) is not None:
            self.host = None
            self._finalizer()
            self.ptr = None

    def __enter__(self) -> "PinnedTable":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _free_host(ptr: int) -> None:
    _runtime().cudaFreeHost(ptr)
