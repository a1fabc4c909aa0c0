"""The decoder-only transformer of the three families we run (Llama, Qwen2, Gemma 3), in one file.

Plain functions over a dict of canonical weights (docs/FORMATS.md), composed from the ops' CPU
references (ops/norm.py, ops/attention.py, ops/act.py): the decoder block is written once, here. Every matrix product with a
layer's weights goes through a `linear(layer, kind, x)` callback, so the same forward serves the
reference model, the quantized model and the DecDEC simulation: they differ only in that callback.

Shapes: T = tokens in this call, D = dim, H / KV = query / key-value heads, hd = head_dim.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from decdec.args import ModelArgs  # noqa: F401 - the model's shapes, re-exported
from decdec.constants import LINEAR_KINDS  # noqa: F401 - re-exported
from decdec.ops.act import act_mul
from decdec.ops.attention import KVCache, attend
from decdec.ops.norm import residual_add, rms_norm

Linear = Callable[[int, str, torch.Tensor], torch.Tensor]  # (layer, kind, x [T, in]) -> [T, out]


def reference_linear(weights: dict[str, torch.Tensor]) -> Linear:
    """The full-precision linear: x @ W^T."""
    return lambda layer, kind, x: x @ weights[f"layers.{layer}.{kind}"].T


def embed(args: ModelArgs, weights: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    x = weights["embed"][tokens]
    if args.is_gemma:  # Gemma scales embeddings by sqrt(dim) (rounded to the weight dtype, as HF does)
        x = x * torch.tensor(math.sqrt(args.dim), dtype=x.dtype)
    return x


def block(args, weights, layer: int, x, positions, linear: Linear, cache: KVCache | None):
    """One decoder layer on x [T, D]; writes its keys/values into `cache` when given."""
    p = f"layers.{layer}."
    post = args.is_gemma
    h = rms_norm(x, weights[p + "attn_norm"], args.norm_eps)
    o = linear(layer, "o", attend(args, weights, layer, linear(layer, "qkv", h), positions, cache))
    x = residual_add(args, weights, x, o, p + "post_attn_norm" if post else None)
    h = rms_norm(x, weights[p + "ffn_norm"], args.norm_eps)
    d = linear(layer, "down", act_mul(args, linear(layer, "gate_up", h)))
    return residual_add(args, weights, x, d, p + "post_ffn_norm" if post else None)


def forward(args: ModelArgs, weights: dict[str, torch.Tensor], tokens: torch.Tensor, linear: Linear | None = None,
            start_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
    """Logits [T, vocab] for tokens [T] at positions start_pos .. start_pos+T-1.

    Without a cache the tokens attend only to each other (teacher-forced evaluation of a window);
    with one, they also attend to every earlier position stored in it (prefill, then decode steps).
    """
    linear = linear or reference_linear(weights)
    positions = torch.arange(start_pos, start_pos + tokens.shape[0], device=tokens.device)
    x = embed(args, weights, tokens)
    for layer in range(args.n_layers):
        x = block(args, weights, layer, x, positions, linear, cache)
    x = rms_norm(x, weights["norm"], args.norm_eps)
    return x @ weights["lm_head"].T
