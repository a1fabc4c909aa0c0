"""Residual add + RMSNorm op: the glue between two sublayers of the decode step, as one kernel.

    x_new = x + post_norm(branch)      (Gemma's post-norm of the branch; plain x + branch elsewhere)
    h     = rms_norm(x_new, weight)    (the next GEMV's fp16 input)

The residual stream x stays float32 (Gemma 3's exceeds fp16's range); the branch is a GEMV's fp16
output. Without a branch it is the plain RMSNorm of x (layer 0's first norm, after the embedding).
`rms_norm` and `residual_add` are the model's math (models/arch.py composes them),
`add_rms_norm_reference` their fused form as the kernel computes it, `AddRmsNorm` the kernel.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda, float32

from decdec.args import ModelArgs
from decdec.ops.ptx import half2_floats, pack_half2, pdl_supported, release_dependents, wait_upstream
from decdec.ops.reduce import SCRATCH, WARPS_MAX, block_sum, words

PAIRS_PER_THREAD = 4  # fp16 pairs a thread takes: fewer warps to sum over, enough loads in flight each
MAX_THREADS = 512  # one block: 4 pairs a thread up to 4096 channels
MAX_DIM = 8192  # channels: at most 8 fp16 pairs a thread


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def residual_add(args: ModelArgs, weights, x: torch.Tensor, branch: torch.Tensor, post_norm: str | None) -> torch.Tensor:
    """x + branch, with Gemma's post-norm on the branch."""
    if post_norm is not None:
        branch = rms_norm(branch, weights[post_norm], args.norm_eps)
    return x + branch


def add_rms_norm_reference(args: ModelArgs, x: torch.Tensor, weight: torch.Tensor, branch: torch.Tensor | None = None,
                           post_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_new float32, h fp16) for x float32 [dim], branch fp16 [dim] or None, weights float32 [dim]."""
    x = x.float()
    if branch is not None:
        b = branch.float()
        x = x + (rms_norm(b, post_weight.float(), args.norm_eps) if post_weight is not None else b)
    return x, rms_norm(x, weight.float(), args.norm_eps).half()


@functools.lru_cache(maxsize=None)
def _add_rms_norm_kernel(per_thread: int):
    """The kernel for `per_thread` fp16 pairs a thread (a constant: the thread's values stay in registers)."""
    P = per_thread
    VALUES = 2 * P  # local array sizes must be literal constants for Numba
    PDL = pdl_supported()

    @cuda.jit
    def kernel(x, branch, post_weight, weight, x_out, h, dim, eps, has_branch, has_post):
        """One block of T = min(512, dim / 8 rounded up to a warp) threads; thread t owns fp16 pairs
        t, t + T, ... (at most P).

        x float32 [dim], branch fp16 pairs as uint32 [dim / 2], weights float32 [dim] -> x_out float32
        [dim] (may alias x), h fp16 pairs as uint32 [dim / 2]. Every load is issued before the first
        reduction (a single block has little else to hide its memory latency behind), then one block
        sum (two with Gemma's post-norm). The weights are loaded before `wait_upstream` (nothing in the
        step writes them), x and the branch after it. Bytes at dim 4096 with a branch: 16 KiB x + 8 KiB branch +
        16 KiB weight (+16 KiB post-norm weight on Gemma) read; 16 KiB x_out + 8 KiB h written.
        """
        red = cuda.shared.array(WARPS_MAX, float32)
        scratch = cuda.shared.array(SCRATCH, float32)
        xv = cuda.local.array(VALUES, float32)
        bv = cuda.local.array(VALUES, float32)
        wv = cuda.local.array(VALUES, float32)
        tid = cuda.threadIdx.x
        nthr = cuda.blockDim.x
        pairs = dim // 2
        for j in range(P):  # bv holds the post-norm's weight until the branch arrives
            p = tid + j * nthr
            w0 = w1 = pw0 = pw1 = float32(0)
            if p < pairs:
                w0, w1 = weight[2 * p], weight[2 * p + 1]
                if has_post:
                    pw0, pw1 = post_weight[2 * p], post_weight[2 * p + 1]
            wv[2 * j], wv[2 * j + 1] = w0, w1
            bv[2 * j], bv[2 * j + 1] = pw0, pw1
        if PDL:
            wait_upstream()
            release_dependents()
        ssb = float32(0)  # the branch's square sum (Gemma's post-norm)
        for j in range(P):
            p = tid + j * nthr
            b0 = b1 = x0 = x1 = float32(0)
            if p < pairs:
                x0, x1 = x[2 * p], x[2 * p + 1]
                if has_branch:
                    b0, b1 = half2_floats(branch[p])
                    ssb += b0 * b0 + b1 * b1
                    if has_post:  # the post-norm's weight now, its 1 / rms once the sum is known
                        b0 *= bv[2 * j]
                        b1 *= bv[2 * j + 1]
            xv[2 * j], xv[2 * j + 1] = x0, x1
            bv[2 * j], bv[2 * j + 1] = b0, b1
        rb = float32(1)
        if has_branch and has_post:
            rb = float32(1) / math.sqrt(block_sum(ssb, red, scratch) / float32(dim) + eps)
        ss = float32(0)
        for j in range(VALUES):
            if has_branch:
                xv[j] += bv[j] * rb
            ss += xv[j] * xv[j]
        r = float32(1) / math.sqrt(block_sum(ss, red, scratch) / float32(dim) + eps)  # float32: / dim is float64
        for j in range(P):
            p = tid + j * nthr
            if p < pairs:
                if has_branch:
                    x_out[2 * p] = xv[2 * j]
                    x_out[2 * p + 1] = xv[2 * j + 1]
                h[p] = pack_half2(xv[2 * j] * r * wv[2 * j], xv[2 * j + 1] * r * wv[2 * j + 1])

    return kernel


class AddRmsNorm:
    """A prepared fused norm: (x_out, h) = (x + post_norm(branch), rms_norm(x_new)) per launch.

    All arrays are Numba device arrays (views of torch buffers, made once): x / x_out / weights
    float32 [dim], branch / h fp16 [dim]. Without `branch` it is rms_norm(x) alone (x_out unused).
    """

    def __init__(self, args: ModelArgs, weight, x, h, branch=None, x_out=None, post_weight=None):
        dim = weight.shape[0]
        if dim % 2 or dim > MAX_DIM:
            raise ValueError(f"dim = {dim}: the fused norm takes an even width up to {MAX_DIM}")
        self.threads = min(MAX_THREADS, -(-dim // (64 * PAIRS_PER_THREAD)) * 32)
        self.kernel = _add_rms_norm_kernel(-(-dim // 2 // self.threads))
        self.dim, self.eps = dim, np.float32(args.norm_eps)
        self.has_branch, self.has_post = branch is not None, post_weight is not None
        dummy = cuda.device_array(1, np.float32) if branch is None or post_weight is None else None
        self.args = (x, words(branch) if branch is not None else dummy.view(np.uint32),
                     post_weight if post_weight is not None else dummy, weight,
                     x_out if x_out is not None else x, words(h))

    def __call__(self, stream=0) -> None:
        self.kernel[1, self.threads, stream](*self.args, self.dim, self.eps, self.has_branch, self.has_post)
