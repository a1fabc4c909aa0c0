"""The decoder-only transformer of the three families we run (Llama, Qwen2, Gemma 3), in one file.

Plain functions over a dict of canonical weights (docs/FORMATS.md), composed from the ops' CPU
references (ops/norm.py, ops/attention.py, ops/act.py). The decoder block is written once, here,
over `LayerOps`: the same `block` computes this forward and builds the runtime's op graph
(models/graph.py). Every matrix product with a layer's weights goes through a `linear(layer, kind, x)`
callback, so the same forward serves the reference model, the quantized model and the DecDEC
simulation: they differ only in that callback.

Shapes: T = tokens in this call, D = dim, H / KV = query / key-value heads, hd = head_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class LayerOps:
    """The ops one decoder layer is made of, so that `block` is its only spelling: `torch_ops` computes
    on tensors, models/graph.py records graph nodes over value names. Each op also takes the name its
    result has in the graph (h, qkv, ...: `decdec graph` prints them); the torch ops ignore it."""
    layer: int
    norm: Callable  # (x, weight key, name) -> rms_norm(x)
    linear: Callable  # (kind, x, name) -> x @ W^T, the layer's linear group `kind`
    attention: Callable  # (qkv, name) -> the attention output
    residual_add: Callable  # (x, branch, post-norm key or None, name) -> x + post_norm(branch)
    act_mul: Callable  # (gate_up, name) -> act(gate) * up


def torch_ops(args: ModelArgs, weights, layer: int, positions, linear: Linear, cache: KVCache | None) -> LayerOps:
    """The ops on tensors [T, width], from the ops' CPU references; attention writes its keys/values
    into `cache` when given."""
    return LayerOps(
        layer, norm=lambda x, weight, _: rms_norm(x, weights[weight], args.norm_eps),
        linear=lambda kind, x, _: linear(layer, kind, x),
        attention=lambda qkv, _: attend(args, weights, layer, qkv, positions, cache),
        residual_add=lambda x, branch, post_norm, _: residual_add(args, weights, x, branch, post_norm),
        act_mul=lambda gate_up, _: act_mul(args, gate_up))


def block(args: ModelArgs, ops: LayerOps, x):
    """One decoder layer on x; its output is the next layer's x. Each value is named as in the graph."""
    p, post = f"layers.{ops.layer}.", args.is_gemma
    h = ops.norm(x, p + "attn_norm", "h")
    o = ops.linear("o", ops.attention(ops.linear("qkv", h, "qkv"), "attn"), "o")
    x = ops.residual_add(x, o, p + "post_attn_norm" if post else None, "xa")
    h = ops.norm(x, p + "ffn_norm", "h2")
    d = ops.linear("down", ops.act_mul(ops.linear("gate_up", h, "gu"), "a"), "d")
    return ops.residual_add(x, d, p + "post_ffn_norm" if post else None, "x")


def hidden(args: ModelArgs, weights: dict[str, torch.Tensor], tokens: torch.Tensor, linear: Linear,
           start_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
    """The residual stream after the last layer [T, D], for tokens [T] at positions start_pos ..
    start_pos+T-1 (what calibration needs: every linear group's input, no final norm or lm_head)."""
    positions = torch.arange(start_pos, start_pos + tokens.shape[0], device=tokens.device)
    x = embed(args, weights, tokens)
    for layer in range(args.n_layers):
        x = block(args, torch_ops(args, weights, layer, positions, linear, cache), x)
    return x


def forward(args: ModelArgs, weights: dict[str, torch.Tensor], tokens: torch.Tensor, linear: Linear | None = None,
            start_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
    """Logits [T, vocab] for tokens [T] at positions start_pos .. start_pos+T-1.

    Without a cache the tokens attend only to each other (teacher-forced evaluation of a window);
    with one, they also attend to every earlier position stored in it (prefill, then decode steps).
    """
    x = hidden(args, weights, tokens, linear or reference_linear(weights), start_pos, cache)
    return rms_norm(x, weights["norm"], args.norm_eps) @ weights["lm_head"].T
