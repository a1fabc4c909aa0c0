"""Warp and block reductions for the layer kernels (norm, attention), with simulator twins.

On the GPU `warp_sum` / `warp_max` are five `shfl_xor_sync` steps (every lane gets the result);
`lanes8_sum` / `lanes8_max` three, over each aligned group of 8 lanes; `lanes_sum(v, n)` log2(n) over
each aligned group of n lanes (n a power of 2, a constant of the caller).
Numba's CUDA simulator has no warp shuffles, so there the twins exchange values through `scratch`, a
block-shared float32 array of `SCRATCH` slots (one per thread; 1 slot on the GPU, which ignores it),
between two barriers: as with `ptx.mma_f16`, every thread of the block must call them the same
number of times. `block_sum` adds one shared slot per warp (`red`, WARPS_MAX floats) and two
barriers; it returns the sum to every thread.
"""

from __future__ import annotations


import numpy as np
from numba import cuda, float32

SIMULATED = cuda.jit.__module__.startswith("numba.cuda.simulator")
WARPS_MAX = 32  # warps of a 1024-thread block: the `red` slots of a block reduction
SCRATCH = 1024 if SIMULATED else 1  # slots of the simulator's shuffle stand-in (threads of a block)
FULL_MASK = 0xFFFFFFFF


if SIMULATED:
    def _warp_values(v, scratch):
        tid = cuda.threadIdx.x
        scratch[tid] = v
        cuda.syncthreads()
        base = tid - tid % 32
        values = np.array(scratch[base:base + 32], np.float32)
        cuda.syncthreads()  # the scratch is rewritten by the next call
        return values

    @cuda.jit(device=True)
    def warp_sum(v, scratch):
        return np.float32(_warp_values(v, scratch).sum(dtype=np.float32))

    @cuda.jit(device=True)
    def warp_max(v, scratch):
        return np.float32(_warp_values(v, scratch).max())

    @cuda.jit(device=True)
    def lanes8_max(v, scratch):
        first = cuda.threadIdx.x % 32 // 8 * 8
        return np.float32(_warp_values(v, scratch)[first:first + 8].max())

    @cuda.jit(device=True)
    def lanes_sum(v, n, scratch):
        first = cuda.threadIdx.x % 32 // n * n
        return np.float32(_warp_values(v, scratch)[first:first + n].sum(dtype=np.float32))
else:
    @cuda.jit(device=True)
    def lanes_sum(v, n, scratch):
        step = n // 2
        while step:
            v += cuda.shfl_xor_sync(FULL_MASK, v, step)
            step //= 2
        return v

    @cuda.jit(device=True)
    def lanes8_max(v, scratch):
        v = max(v, cuda.shfl_xor_sync(FULL_MASK, v, 4))
        v = max(v, cuda.shfl_xor_sync(FULL_MASK, v, 2))
        return max(v, cuda.shfl_xor_sync(FULL_MASK, v, 1))

    @cuda.jit(device=True)
    def warp_sum(v, scratch):  # the two halves' and quarters' sums, then the 8 lanes'
        v += cuda.shfl_xor_sync(FULL_MASK, v, 16)
        return lanes8_sum(v + cuda.shfl_xor_sync(FULL_MASK, v, 8), scratch)

    @cuda.jit(device=True)
    def warp_max(v, scratch):
        v = max(v, cuda.shfl_xor_sync(FULL_MASK, v, 16))
        return lanes8_max(max(v, cuda.shfl_xor_sync(FULL_MASK, v, 8)), scratch)


@cuda.jit(device=True)
def lanes8_sum(v, scratch):
    return lanes_sum(v, 8, scratch)


@cuda.jit(device=True)
def block_sum(v, red, scratch):
    """Sum of v over the block (blockDim.x a multiple of 32), for every thread."""
    tid = cuda.threadIdx.x
    v = warp_sum(v, scratch)
    if tid % 32 == 0:
        red[tid // 32] = v
    cuda.syncthreads()
    s = float32(0)
    for w in range(cuda.blockDim.x // 32):
        s += red[w]
    cuda.syncthreads()  # `red` is rewritten by the next call
    return s


def words(a):
    """A flat uint32 view of a contiguous Numba device array of 16-bit values (pairs as one word)."""
    return a.reshape(a.size).view(np.uint32)
