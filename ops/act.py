"""Activation x up op: act(gate) * up of the gate_up GEMV's fp16 output (the down GEMV's input).

SiLU (Llama, Qwen2) or tanh-GELU (Gemma 3), computed in float32. `act_mul` is the model's math,
`act_mul_reference` its fp16 form. On the GPU it has no launch of its own: the down GEMV and its
correction compute it as they read gate_up (`act_value`, their prologue: ops.base_gemv.PROLOGUES).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from numba import cuda, float32

from decdec.args import ModelArgs

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
    """act(g) of one float32 gate value: tanh-GELU (`gelu`) or SiLU, as `activation` computes it."""
    if gelu:
        return float32(0.5) * g * (float32(1) + math.tanh(float32(GELU_C) * (g + float32(0.044715) * g * g * g)))
    return g / (float32(1) + math.exp(-g))
