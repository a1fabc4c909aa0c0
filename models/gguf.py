"""Our own reader for GGUF v2/v3 files (llama.cpp's model format), with NumPy dequantization.

    f = read_gguf("model.gguf")          # parses the header only; tensor data is memory-mapped
    f.architecture                       # "llama", "gemma3", ...
    f.metadata["llama.block_count"]      # plain Python values
    f.tensors["token_embd.weight"].shape # NumPy/torch order, e.g. (vocab, dim)
    f.load("token_embd.weight")          # float32 ndarray of that shape

File layout (all little-endian):

    magic b"GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x      (key: str, value_type: u32, value)
    n_tensors x (name: str, n_dims: u32, dims: u64[n_dims], ggml_type: u32, offset: u64)
    padding to `general.alignment` (default 32), then the tensor data; offsets are relative to it.

A string is (length u64, UTF-8 bytes); an array is (element type u32, count u64, elements).
GGUF lists dims fastest-varying first (ggml's `ne[0]` is the row length), so our shape is the
dims reversed: a `[640, 262144]` token embedding is `(262144, 640)` here. Quantized types pack
`block_size` consecutive elements of a row into `type_size` bytes; the layouts and formulas
below are ggml's (`ggml-common.h`, `dequantize_row_*` in `ggml-quants.c`).

Of the `gguf` package (llama.cpp's own Python code) we take only the table of tensor types: its
reader parses a large vocabulary's metadata element by element and its dequantizers allocate fresh
temporaries, both many times slower than this file on the embedded model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from decdec.errors import ModelFileError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts; v2 and v3 (adds big-endian) share a layout
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml tensors have at most 4 dims; more means a corrupt tensor table

# ggml type id -> (name, elements per block, bytes per block), from llama.cpp's own Python package: every
# type llama.cpp defines, so that tensors we cannot dequantize are still sized, bounds-checked and named.
GGML_TYPES = {t.value: (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType}
_TYPE_SIZES = {name: (block, size) for name, block, size in GGML_TYPES.values()}

# Each dequantized block batch is at most this many elements (256 KiB of float32): big enough
# that NumPy's per-call overhead vanishes, small enough that the temporaries stay in cache.
_CHUNK_ELEMENTS = 1 << 16


# ----------------------------------------------------------------------------------------------
# Dequantization: each function reads uint8 blocks `[n, type_size]` and writes their float32
# values into `out` `[n, block_size]`. Writing in place, rather than returning new arrays, keeps
# the batch's temporaries to a few small uint8 arrays: fresh float32 temporaries are several times
# slower (each one page-faults anew).


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of every block, as float32 `[n, 1]`."""
    return blocks[:, at : at + 2].view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """`[n, k]` bytes -> `[n, 2k]` 4-bit codes: all low nibbles, then all high nibbles."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """`[n, 4]` bytes read as one little-endian u32 -> its 32 bits `[n, 32]`, bit 0 first."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _deq_f32(blocks: np.ndarray, out: np.ndarray) -> None:
    out[...] = blocks.view(np.float32)


def _deq_f16(blocks: np.ndarray, out: np.ndarray) -> None:
    out[...] = blocks.view(np.float16)


def _deq_bf16(blocks: np.ndarray, out: np.ndarray) -> None:
    # bfloat16 is the top half of a float32
    bits = out.view(np.uint32)
    bits[...] = blocks.view(np.uint16)
    bits <<= 16


def _deq_q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    # {d: f16, qs: int8[32]}: x = d * q
    out[...] = blocks[:, 2:].view(np.int8)
    out *= _f16(blocks, 0)


def _deq_q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    # {d: f16, qs: u8[16]}: x = d * (q - 8); element j < 16 in the low nibble of qs[j], j >= 16
    # in the high nibble of qs[j - 16]
    out[...] = _nibbles(blocks[:, 2:18])
    out -= 8
    out *= _f16(blocks, 0)


def _deq_q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    # {d: f16, m: f16, qs: u8[16]}: x = d * q + m
    out[...] = _nibbles(blocks[:, 4:20])
    out *= _f16(blocks, 0)
    out += _f16(blocks, 2)


def _deq_q5_0(blocks: np.ndarray, out: np.ndarray) -> None:
    # {d: f16, qh: u32, qs: u8[16]}: 5-bit q = nibble | (bit j of qh) << 4; x = d * (q - 16)
    out[...] = _nibbles(blocks[:, 6:22]) | (_high_bits(blocks[:, 2:6]) << 4)
    out -= 16
    out *= _f16(blocks, 0)


def _deq_q5_1(blocks: np.ndarray, out: np.ndarray) -> None:
    # {d: f16, m: f16, qh: u32, qs: u8[16]}: x = d * q + m
    out[...] = _nibbles(blocks[:, 8:24]) | (_high_bits(blocks[:, 4:8]) << 4)
    out *= _f16(blocks, 0)
    out += _f16(blocks, 2)


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, each `[n, 8]` float32.

    Bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; scales/mins 4-7 take
    their low 4 bits from bytes 8-11 (scale in the low nibble, min in the high one) and their
    top 2 bits from the spare top bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate((first & 63, (third & 0x0F) | ((first >> 6) << 4)), axis=1)
    mins = np.concatenate((second & 63, (third >> 4) | ((second >> 6) << 4)), axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_quant(blocks: np.ndarray, q: np.ndarray, out: np.ndarray) -> None:
    """Q4_K/Q5_K: 8 sub-blocks of 32 codes `q` `[n, 8, 32]`; x = d * scale * q - dmin * min."""
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    sub_blocks = out.reshape(len(blocks), 8, 32)
    sub_blocks[...] = q
    sub_blocks *= (_f16(blocks, 0) * scales)[:, :, None]
    sub_blocks -= (_f16(blocks, 2) * mins)[:, :, None]


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> `[n, 8, 32]` codes: each 32 bytes give a sub-block of low nibbles, then one
    of high nibbles."""
    qs = qs.reshape(len(qs), 4, 1, 32)
    return np.concatenate((qs & 0x0F, qs >> 4), axis=2).reshape(len(qs), 8, 32)


def _deq_q4_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # {d: f16, dmin: f16, scales: u8[12], qs: u8[128]}
    _k_quant(blocks, _k_nibbles(blocks[:, 16:144]), out)


def _deq_q5_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # {d: f16, dmin: f16, scales: u8[12], qh: u8[32], qs: u8[128]}: sub-block s takes its fifth
    # bit from bit s of qh[l], for l = 0..31
    qh = blocks[:, 16:48]
    shifts = np.arange(8, dtype=np.uint8)[None, :, None]
    high = (qh[:, None, :] >> shifts) & 1  # [n, 8, 32]
    _k_quant(blocks, _k_nibbles(blocks[:, 48:176]) | (high << 4), out)


def _deq_q6_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # {ql: u8[128], qh: u8[64], scales: int8[16], d: f16}; two halves of 128 elements. In half h,
    # quarter k (elements 32k..32k+31, k = 0..3) takes its low 4 bits from ql[64h + 32(k % 2) + l]
    # (low nibble for k < 2, high for k >= 2) and its top 2 bits from qh[32h + l] >> 2k;
    # x = d * scale[16-element sub-block] * (q - 32).
    n = len(blocks)
    ql = blocks[:, 0:128].reshape(n, 2, 1, 64)
    low = np.concatenate((ql & 0x0F, ql >> 4), axis=2).reshape(n, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3  # [n, 2, 4, 32]
    sub_blocks = out.reshape(n, 16, 16)
    sub_blocks[...] = (low | (high << 4)).reshape(n, 16, 16)
    sub_blocks -= 32
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    sub_blocks *= (_f16(blocks, 208) * scales)[:, :, None]


_DEQUANTIZERS: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {
    "F32": _deq_f32,
    "F16": _deq_f16,
    "BF16": _deq_bf16,
    "Q8_0": _deq_q8_0,
    "Q4_0": _deq_q4_0,
    "Q4_1": _deq_q4_1,
    "Q5_0": _deq_q5_0,
    "Q5_1": _deq_q5_1,
    "Q4_K": _deq_q4_k,
    "Q5_K": _deq_q5_k,
    "Q6_K": _deq_q6_k,
}
SUPPORTED_TYPES: tuple[str, ...] = tuple(_DEQUANTIZERS)


def dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Dequantize the raw bytes of `type_name` data (a whole number of blocks) to flat float32.

    Works through the blocks in batches so that temporaries stay small; there is no Python loop
    per block. Raises `UnsupportedModelError` for a type we have no dequantizer for.
    """
    if type_name not in _DEQUANTIZERS:
        raise UnsupportedModelError(f"cannot dequantize GGML type {type_name}; supported: {', '.join(SUPPORTED_TYPES)}")
    block_size, type_size = _TYPE_SIZES[type_name]
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, type_size)  # whole blocks, or a ValueError
    out = np.empty((len(blocks), block_size), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, len(blocks), step):
        _DEQUANTIZERS[type_name](blocks[start : start + step], out[start : start + step])
    return out.reshape(-1)


# ----------------------------------------------------------------------------------------------
# Header parsing.

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# GGUF metadata value type ids; the numeric ones map to their (little-endian) NumPy dtype.
_STRING, _ARRAY, _BOOL = 8, 9, 7
_NUMERIC_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<u1"),
    1: np.dtype("<i1"),
    2: np.dtype("<u2"),
    3: np.dtype("<i2"),
    4: np.dtype("<u4"),
    5: np.dtype("<i4"),
    6: np.dtype("<f4"),
    10: np.dtype("<u8"),
    11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
_SCALARS = {**_NUMERIC_DTYPES, _BOOL: np.dtype("<u1")}  # the value types read as NumPy data
# the fewest bytes one array element can take (an empty string or array still has its header)
_MIN_ELEMENT_BYTES = {**{type_id: dtype.itemsize for type_id, dtype in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}


class _Cursor:
    """Reads the header front to back; every read past the end becomes a `ModelFileError` that
    names the file and what was being read (`where`, kept up to date by the parser)."""

    def __init__(self, buf: np.ndarray, path: Path) -> None:
        self.buf = buf
        self.view = memoryview(buf)
        self.path = path
        self.pos = 0
        self.where = "the header"

    def fail(self, problem: str, damage: str = "corrupt") -> ModelFileError:
        return ModelFileError(f"{self.path}: {damage} GGUF file: {problem} (while reading {self.where})")

    def take(self, n: int) -> int:
        """Advance over `n` bytes and return where they start."""
        if n > len(self.buf) - self.pos:
            raise self.fail(f"needs {n} bytes at offset {self.pos} but the file ends at {len(self.buf)}",
                            damage="truncated or corrupt")
        start, self.pos = self.pos, self.pos + n
        return start

    def u32(self) -> int:
        return _U32.unpack_from(self.view, self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.view, self.take(8))[0]

    def string(self) -> str:
        start = self.take(self.u64())
        try:
            return str(self.view[start : self.pos], "utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"string at offset {start} is not valid UTF-8 ({e.reason})") from None

    def count(self, n: int, min_bytes: int, what: str) -> int:
        """Reject a count of items that cannot fit in the rest of the file (a corrupt header
        would otherwise make us loop for hours or allocate terabytes)."""
        if n * min_bytes > len(self.buf) - self.pos:
            raise self.fail(f"{what} count {n} cannot fit in the {len(self.buf) - self.pos} bytes left",
                            damage="truncated or corrupt")
        return n

    def value(self, value_type: int) -> object:
        """One metadata value of the given GGUF value type, as a plain Python object."""
        if value_type in _SCALARS:
            return self.scalars(value_type, 1)[0]
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        raise self.fail(f"unknown metadata value type {value_type}")

    def names(self, n: int, what: str):
        """Yield the name that opens each of `n` table entries (`what`: "tensor info", ...); `where`
        names the entry while the caller reads the rest of it. A name seen before is corrupt."""
        seen = set()
        for i in range(n):
            self.where = f"{what} {i} of {n}"
            name = self.string()
            self.where = f"{what} {i} of {n} ({name!r})"
            if name in seen:
                raise self.fail(f"duplicate name {name!r}")
            seen.add(name)
            yield name

    def array(self) -> list:
        element_type, n = self.u32(), self.u64()
        if element_type not in _MIN_ELEMENT_BYTES:
            raise self.fail(f"unknown array element type {element_type}")
        self.count(n, _MIN_ELEMENT_BYTES[element_type], "array element")
        if element_type in _SCALARS:
            return self.scalars(element_type, n)
        return [self.value(element_type) for _ in range(n)]

    def scalars(self, value_type: int, n: int) -> list:
        """`n` numbers (or bools) in one vectorized read: token score / type arrays have 262k entries."""
        dtype = _SCALARS[value_type]
        values = np.frombuffer(self.buf, dtype, n, self.take(n * dtype.itemsize))
        return (values != 0 if value_type == _BOOL else values).tolist()


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table. `shape` is NumPy/torch order (GGUF's dims reversed);
    `offset` is the absolute byte offset of the data in the file, `n_bytes` its length."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    offset: int
    n_bytes: int

    @property
    def supported(self) -> bool:
        """Whether `GGUFFile.load` can dequantize this tensor's type."""
        return self.type_name in _DEQUANTIZERS


class GGUFFile:
    """An opened GGUF file: metadata and tensor table parsed, tensor data memory-mapped.

    Use `read_gguf(path)` to open one; `load(name)` dequantizes one tensor to float32.
    """

    def __init__(self, path: Path, data: np.ndarray) -> None:
        self.path = path
        self._data = data  # the whole file, np.memmap of uint8
        cursor = _Cursor(data, path)
        self.version = _read_preamble(cursor)
        n_tensors = cursor.count(cursor.u64(), 24, "tensor")  # a tensor info is >= 24 bytes
        n_kv = cursor.count(cursor.u64(), 13, "metadata entry")  # an entry is >= 13 bytes
        self.metadata = {key: cursor.value(cursor.u32()) for key in cursor.names(n_kv, "metadata entry")}
        self.alignment = _alignment(cursor, self.metadata)
        infos = [_read_tensor_info(cursor, name, self.alignment) for name in cursor.names(n_tensors, "tensor info")]
        data_start = -(-cursor.pos // self.alignment) * self.alignment  # round up: tensor offsets count from here
        self.tensors: dict[str, GGUFTensor] = {}
        for t in infos:
            t = dataclasses.replace(t, offset=data_start + t.offset)
            if t.offset + t.n_bytes > len(data):
                raise ModelFileError(
                    f"{path}: truncated or corrupt GGUF file: tensor {t.name!r} ({t.type_name}, shape {t.shape}) "
                    f"needs bytes {t.offset}..{t.offset + t.n_bytes} but the file has only {len(data)} bytes")
            self.tensors[t.name] = t

    @property
    def architecture(self) -> str:
        """The model family, metadata `general.architecture` (e.g. "llama", "gemma3")."""
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFileError(f"{self.path}: GGUF metadata has no 'general.architecture' string")
        return arch

    def load(self, name: str) -> np.ndarray:
        """Dequantize tensor `name` to a new float32 array of its shape."""
        t = self._tensor(name)
        if not t.supported:
            raise self._unsupported([t])
        # always a fresh array (F32 too), never a view of the read-only map
        return dequantize(self._data[t.offset : t.offset + t.n_bytes], t.type_name).reshape(t.shape)

    def check_supported(self) -> None:
        """Raise `UnsupportedModelError` now if any tensor has a type `load` cannot dequantize."""
        bad = [t for t in self.tensors.values() if not t.supported]
        if bad:
            raise self._unsupported(bad)

    def _tensor(self, name: str) -> GGUFTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFileError(f"{self.path}: no tensor {name!r} (the file has {len(self.tensors)} tensors)") from None

    def _unsupported(self, tensors: list[GGUFTensor]) -> UnsupportedModelError:
        shown = ", ".join(f"{t.name!r} ({t.type_name})" for t in tensors[:5])
        more = f" and {len(tensors) - 5} more" if len(tensors) > 5 else ""
        noun = "tensor" if len(tensors) == 1 else "tensors"
        return UnsupportedModelError(f"{self.path}: cannot dequantize {noun} {shown}{more}; supported tensor types: "
                                     f"{', '.join(SUPPORTED_TYPES)}")


def _read_preamble(cursor: _Cursor) -> int:
    """Check the magic (already known to match) and return the version."""
    cursor.take(4)
    version = cursor.u32()
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and version >> 24 in SUPPORTED_VERSIONS:
            problem = "is a big-endian GGUF file, which is not supported"
        else:
            problem = f"has GGUF version {version}, which is not supported"
        raise ModelFileError(f"{cursor.path} {problem} (supported: little-endian versions "
                             f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    return version


def _alignment(cursor: _Cursor, metadata: dict[str, object]) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cursor.fail(f"general.alignment {alignment!r} is not a positive power of two")
    return alignment


def _read_tensor_info(cursor: _Cursor, name: str, alignment: int) -> GGUFTensor:
    """The rest of one tensor table entry, sized; its offset is still relative to the data section."""
    n_dims = cursor.u32()
    if n_dims > MAX_DIMS:
        raise cursor.fail(f"tensor {name!r} has {n_dims} dims (at most {MAX_DIMS})")
    shape = tuple(reversed([cursor.u64() for _ in range(n_dims)]))
    type_id = cursor.u32()
    if type_id not in GGML_TYPES:
        raise UnsupportedModelError(f"{cursor.path}: tensor {name!r} has unknown GGML type id {type_id} (a newer "
                                    f"GGUF?); supported tensor types: {', '.join(SUPPORTED_TYPES)}")
    type_name, block_size, type_size = GGML_TYPES[type_id]
    offset, row = cursor.u64(), shape[-1] if shape else 1
    if row % block_size:
        raise cursor.fail(f"tensor {name!r} of type {type_name} has rows of {row} elements, not a multiple of its "
                          f"block size {block_size}")
    if offset % alignment:
        raise cursor.fail(f"tensor {name!r} data offset {offset} is not a multiple of the alignment {alignment}")
    return GGUFTensor(name, type_name, shape, offset, math.prod(shape) // block_size * type_size)


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open a GGUF file: parse its header and memory-map its tensor data (cheap; nothing is
    dequantized until `load`). Raises `ModelFileError` for a missing, non-GGUF, truncated or
    corrupt file, or an unsupported GGUF version."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"{path} is not a file (expected a .gguf file)")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file: it starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}")
    return GGUFFile(path, np.memmap(path, dtype=np.uint8, mode="r"))
