"""lm_head op in int8: logits = deq(Q) @ h, one scale per vocabulary row (`quant.lm_head_bits: 8`).

The lm_head is the largest matrix a decode step reads (Llama-3-8B: 128256 x 4096; a tied Gemma 3 270M
embedding is most of the model), and the step reads all of it for one token: at 1 byte a weight it
reads half the bytes of fp16. Symmetric with a scale per row, it moves perplexity by well under 1 %
(`bench/lm_head_quality.py`), where 4-bit groups cost 9 to 32 %.

`quantize_rows_int8` makes the stored form: codes q + 128 as uint8 [vocab, dim] and float32 scales
[vocab] (scale = max |row| / 127, round to nearest). `dequantize_rows` is the weight the CPU
reference multiplies by, `Int8LmHead` the Numba CUDA kernel.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from numba import cuda, float32

from decdec.ops.ptx import byte_floats, half2_floats, load_u32x4, pdl_supported, wait_upstream
from decdec.ops.reduce import SCRATCH, lanes_sum

SIMULATED = cuda.jit.__module__.startswith("numba.cuda.simulator")
WARPS = 8  # warps per block
THREADS = 32 * WARPS
BLOCKS_PER_SM = 2048 // THREADS  # a full SM: one 16-byte load in flight per thread covers HBM's latency
SHARED_PER_SM = 227 * 1024  # bytes of shared memory one block may use on an SM (sm_80 / sm_90), less 1 KiB
LANES = 8  # lanes per row: a row's vectors (40 at Gemma 3's width 640, 36 at SmolLM2's) keep 8 lanes busy
# (5 / 4.5 loads each) where a whole warp would leave most lanes idle in its last pass; 4 rows a warp also
# share one reduction
ROWS_PER_PASS = THREADS // LANES  # rows a block takes at once
VECTOR = 16  # weights per 16-byte load
MAX_DIM = 8192  # inputs staged in shared memory (34 KiB of float32)
PITCH = VECTOR + 1  # float32 slots per vector in shared memory


def width_supported(dim: int) -> bool:
    """Whether the kernel takes inputs of this width (whole 16-byte vectors, staged in shared memory)."""
    return dim % VECTOR == 0 and dim <= MAX_DIM


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [rows, dim] = round(w / scale) + 128, scale float32 [rows]) for w [rows, dim]."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    q = (w / scale[:, None]).round().clamp(-127, 127) + 128
    return q.to(torch.uint8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight [rows, dim] that the codes stand for."""
    return (q.float() - 128) * scale[:, None]


@cuda.jit(device=True, inline=True)
def _dot4(w, xs, v, e, acc):
    """acc + the four codes of word w times the staged inputs xs[v, e .. e + 3]."""
    b0, b1, b2, b3 = byte_floats(w)
    return acc + b0 * xs[v, e] + b1 * xs[v, e + 1] + b2 * xs[v, e + 2] + b3 * xs[v, e + 3]


@functools.lru_cache(maxsize=None)
def _lm_head_kernel(vecs: int):
    """The kernel for inputs of vecs 16-byte vectors (dim = 16 * vecs: shared size and offsets are constants)."""
    STAGED = (vecs, PITCH)  # shared sizes must be literal constants for Numba
    PDL = pdl_supported()

    @cuda.jit
    def kernel(h, q, scale, out, rows):
        """out[r] = scale[r] * sum_i (q[r, i] - 128) * h[i], float32 accumulation.

        h: the fp16 input as pairs, uint32 [dim / 2]; q: the codes as uint32 [rows * dim / 4], row-major;
        scale, out: float32 [rows]. Launch: [any grid, THREADS]; each group of LANES lanes takes one row at a
        time: group g of the grid takes rows g, g + (groups of the grid), ... Each block first stages h as
        float32 in shared memory, the 16 inputs of vector v at xs[v, 0 .. 15]: the row pitch is odd, so
        lanes reading element e of consecutive vectors hit distinct banks (the other groups read the same
        words: a broadcast), and the element's offset is an immediate. Lane l of a group reads vectors
        l, l + LANES, ... of its row: 128 contiguous bytes per group and load. Bytes moved: rows * dim (codes)
        + 8 * rows (scale, out) + blocks * 2 * dim (h, from L2). Launched behind a programmatic edge, the
        blocks are resident while the norm before it runs, and wait for it before reading h.
        """
        xs = cuda.shared.array(STAGED, float32)
        scratch = cuda.shared.array(SCRATCH, float32)
        tid = cuda.threadIdx.x
        if PDL:
            wait_upstream()
        for p in range(tid, vecs * VECTOR // 2, THREADS):
            lo, hi = half2_floats(h[p])
            v, e = p // (VECTOR // 2), p % (VECTOR // 2) * 2
            xs[v, e], xs[v, e + 1] = lo, hi
        cuda.syncthreads()
        lane = tid % LANES
        # a block's groups take one row each per pass, all passing together (the simulator's lanes_sum
        # needs every thread of the block at it)
        for first in range(cuda.blockIdx.x * ROWS_PER_PASS, rows, cuda.gridDim.x * ROWS_PER_PASS):
            row = first + tid // LANES
            acc = float32(0)
            if row < rows:
                for v in range(lane, vecs, LANES):
                    w0, w1, w2, w3 = load_u32x4(q, (row * vecs + v) * 4)
                    acc = _dot4(w0, xs, v, 0, _dot4(w1, xs, v, 4, _dot4(w2, xs, v, 8, _dot4(w3, xs, v, 12, acc))))
            acc = lanes_sum(acc, LANES, scratch)
            if row < rows and lane == 0:
                out[row] = acc * scale[row]

    return kernel


class Int8LmHead:
    """A prepared int8 lm_head launch: out = deq(codes) @ h.

    codes: uint8 [rows, dim] as from `quantize_rows_int8`, scale / out float32 [rows], h fp16 [dim]:
    Numba device arrays (views of torch buffers, made once). dim must be a multiple of 16, at most MAX_DIM.
    """

    def __init__(self, codes, scale, h, out):
        rows, dim = codes.shape
        if not width_supported(dim):
            raise ValueError(f"lm_head width {dim}: the int8 kernel takes a multiple of {VECTOR} up to {MAX_DIM}")
        n_sm = 2 if SIMULATED else cuda.get_current_device().MULTIPROCESSOR_COUNT
        resident = min(BLOCKS_PER_SM, SHARED_PER_SM // (dim // VECTOR * PITCH * 4))  # one wave: all resident
        self.blocks = min(n_sm * resident, -(-rows // ROWS_PER_PASS))
        self.kernel = _lm_head_kernel(dim // VECTOR)
        self.args = (h.reshape(h.size).view(np.uint32), codes.reshape(codes.size).view(np.uint32), scale, out, rows)

    def __call__(self, stream=0) -> None:
        self.kernel[self.blocks, THREADS, stream](*self.args)
