"""Activation x up op: act(gate) * up of the gate_up GEMV's fp16 output, fp16 out (the down GEMV's input).

SiLU (Llama, Qwen2) or tanh-GELU (Gemma 3), computed in float32. `act_mul_reference` is the CPU
reference (`act_mul`, the model's math); `ActMul` the kernel.

Why a kernel of its own: folding it into the gate_up GEMV's epilogue needs gate row j and up row
ffn + j in one output tile, and folding it into the down GEMV's staging needs the GEMV to read both
halves; either changes the GEMV's layout. Alone it moves 3 x 2 x ffn bytes (84 KiB at ffn 14336) in
one launch of a captured graph.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from numba import cuda, float32

from decdec.args import ModelArgs
from decdec.ops.ptx import half2_floats, pack_half2, pdl_supported, release_dependents, wait_upstream
from decdec.ops.reduce import words

THREADS = 256
GELU_C = math.sqrt(2 / math.pi)  # tanh-GELU: 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))


def activation(args: ModelArgs, gate: torch.Tensor) -> torch.Tensor:
    # Gemma uses GeGLU with the tanh approximation of GELU; Llama and Qwen2 use SwiGLU.
    return F.gelu(gate, approximate="tanh") if args.is_gemma else F.silu(gate)


def act_mul(args: ModelArgs, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return activation(args, gate) * up


def act_mul_reference(args: ModelArgs, gate_up: torch.Tensor) -> torch.Tensor:
    """fp16 [ffn] from gate_up fp16 [2 ffn] (gate first), in float32 as the model computes it."""
    return act_mul(args, gate_up.float()).half()


@cuda.jit(device=True)
def act_value(g, gelu):
    """act(g) in float32 (also the down GEMV's folded prologue, ops.base_gemv)."""
    if gelu:
        return float32(0.5) * g * (float32(1) + math.tanh(float32(GELU_C) * (g + float32(0.044715) * g * g * g)))
    return g / (float32(1) + math.exp(-g))


@functools.lru_cache(maxsize=None)
def _act_mul_kernel():
    PDL = pdl_supported()

    @cuda.jit
    def kernel(gate_up, out, half_pairs, gelu):
        """Thread p of the grid: fp16 pair p of the gate (word p) and of the up half (word half_pairs + p)
        -> word p of out. gate_up, out: fp16 pairs as uint32; grid ceil(ffn / 2 / 256) x 256 threads.
        Bytes at ffn 14336: 56 KiB read, 28 KiB written."""
        if PDL:
            wait_upstream()
            release_dependents()
        p = cuda.grid(1)
        if p < half_pairs:
            g0, g1 = half2_floats(gate_up[p])
            u0, u1 = half2_floats(gate_up[half_pairs + p])
            out[p] = pack_half2(act_value(g0, gelu) * u0, act_value(g1, gelu) * u1)

    return kernel


class ActMul:
    """A prepared act(gate) * up: gate_up fp16 [2 ffn] and out fp16 [ffn] Numba device arrays (views of
    torch buffers, made once); call per launch."""

    def __init__(self, args: ModelArgs, gate_up, out):
        ffn = out.shape[0]
        if ffn % 2 or gate_up.shape[0] != 2 * ffn:
            raise ValueError(f"act_mul takes gate_up [2 ffn] and out [ffn] with ffn even, not {gate_up.shape[0]} "
                             f"and {ffn}")
        self.pairs, self.gelu = ffn // 2, args.is_gemma
        self.gate_up, self.out = words(gate_up), words(out)

    def __call__(self, stream=0) -> None:
        _act_mul_kernel()[-(-self.pairs // THREADS), THREADS, stream](self.gate_up, self.out, self.pairs, self.gelu)
