"""The decoder-only transformer of the three families we run (Llama, Qwen2, Gemma 3), in one file.

Plain functions over a dict of canonical weights (docs/FORMATS.md). Every matrix product with a
layer's weights goes through a `linear(layer, kind, x)` callback, so the same forward serves the
reference model, the quantized model and the DecDEC simulation: they differ only in that callback.

Shapes: T = tokens in this call, D = dim, H / KV = query / key-value heads, hd = head_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from decdec.constants import LINEAR_KINDS

FAMILIES = ("llama", "qwen2", "gemma3")

Linear = Callable[[int, str, torch.Tensor], torch.Tensor]  # (layer, kind, x [T, in]) -> [T, out]


@dataclass(frozen=True)
class ModelArgs:
    family: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    rope_base: float
    rope_local_base: float = 10_000.0  # Gemma 3 sliding-window layers use their own RoPE base
    sliding_window: int | None = None  # Gemma 3: a sliding layer sees the last `sliding_window` keys
    sliding_pattern: int = 0  # Gemma 3: every `sliding_pattern`-th layer is global, the rest slide
    query_scale: float | None = None  # None: head_dim ** -0.5
    tied_embeddings: bool = True
    max_seq_len: int = 4096
    bos_id: int | None = None
    eos_id: int | None = None

    @property
    def is_gemma(self) -> bool:
        return self.family == "gemma3"

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2"

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_pattern > 0 and (layer + 1) % self.sliding_pattern != 0

    def linear_shape(self, kind: str) -> tuple[int, int]:
        """(out, in) of one linear group."""
        return {
            "qkv": (self.q_dim + 2 * self.kv_dim, self.dim),
            "o": (self.dim, self.q_dim),
            "gate_up": (2 * self.ffn_dim, self.dim),
            "down": (self.dim, self.ffn_dim),
        }[kind]

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every canonical weight this model must have, with its shape."""
        shapes: dict[str, tuple[int, ...]] = {
            "embed": (self.vocab_size, self.dim),
            "lm_head": (self.vocab_size, self.dim),
            "norm": (self.dim,),
        }
        for i in range(self.n_layers):
            p = f"layers.{i}."
            shapes[p + "attn_norm"] = (self.dim,)
            shapes[p + "ffn_norm"] = (self.dim,)
            for kind in LINEAR_KINDS:
                shapes[p + kind] = self.linear_shape(kind)
            if self.qkv_bias:
                shapes[p + "qkv_bias"] = (self.q_dim + 2 * self.kv_dim,)
            if self.is_gemma:
                shapes[p + "q_norm"] = (self.head_dim,)
                shapes[p + "k_norm"] = (self.head_dim,)
                shapes[p + "post_attn_norm"] = (self.dim,)
                shapes[p + "post_ffn_norm"] = (self.dim,)
        return shapes


@dataclass
class KVCache:
    """Keys and values of every layer, allocated once for `max_seq_len` positions."""

    k: torch.Tensor  # [n_layers, max_seq_len, KV, hd]
    v: torch.Tensor

    @classmethod
    def allocate(cls, args: ModelArgs, max_seq_len: int, device="cpu", dtype=torch.float32) -> "KVCache":
        shape = (args.n_layers, max_seq_len, args.n_kv_heads, args.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


def reference_linear(weights: dict[str, torch.Tensor]) -> Linear:
    """The full-precision linear: x @ W^T."""
    return lambda layer, kind, x: x @ weights[f"layers.{layer}.{kind}"].T


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE (Hugging Face order) on x [T, heads, hd] at integer positions [T]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=x.device) / hd))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, hd/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention_mask(args: ModelArgs, layer: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Boolean [Tq, Tk]: causal, and inside the sliding window on Gemma 3's local layers."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if args.is_sliding(layer) and args.sliding_window:
        mask &= k_pos[None, :] > q_pos[:, None] - args.sliding_window
    return mask


def attention(args: ModelArgs, layer: int, q, k, v, q_pos, k_pos) -> torch.Tensor:
    """q [T, H, hd], k/v [S, KV, hd] -> [T, H*hd]."""
    group = args.n_heads // args.n_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = args.query_scale if args.query_scale is not None else args.head_dim**-0.5
    mask = attention_mask(args, layer, q_pos, k_pos)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )  # [H, T, hd]
    return out.transpose(0, 1).reshape(q.shape[0], -1)


def activation(args: ModelArgs, gate: torch.Tensor) -> torch.Tensor:
    # Gemma uses GeGLU with the tanh approximation of GELU; Llama and Qwen2 use SwiGLU.
    return F.gelu(gate, approximate="tanh") if args.is_gemma else F.silu(gate)


def embed(args: ModelArgs, weights: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    x = weights["embed"][tokens]
    if args.is_gemma:  # Gemma scales embeddings by sqrt(dim) (rounded to the weight dtype, as HF does)
        x = x * torch.tensor(math.sqrt(args.dim), dtype=x.dtype)
    return x


def attend(args: ModelArgs, weights, layer: int, qkv: torch.Tensor, positions, cache: KVCache | None) -> torch.Tensor:
    """From the qkv projection [T, q+2kv] to the attention output [T, H*hd]: bias, Gemma's q/k norms,
    RoPE, the KV cache (written at `positions`, read up to the last one), and attention."""
    p = f"layers.{layer}."
    T = qkv.shape[0]
    if args.qkv_bias:
        qkv = qkv + weights[p + "qkv_bias"]
    q, k, v = qkv.split([args.q_dim, args.kv_dim, args.kv_dim], dim=-1)
    q = q.reshape(T, args.n_heads, args.head_dim)
    k = k.reshape(T, args.n_kv_heads, args.head_dim)
    v = v.reshape(T, args.n_kv_heads, args.head_dim)
    if args.is_gemma:
        q = rms_norm(q, weights[p + "q_norm"], args.norm_eps)
        k = rms_norm(k, weights[p + "k_norm"], args.norm_eps)
    base = args.rope_local_base if args.is_sliding(layer) else args.rope_base
    q, k = rope(q, positions, base), rope(k, positions, base)
    k_pos = positions
    if cache is not None:
        end = int(positions[-1]) + 1
        cache.k[layer, positions] = k
        cache.v[layer, positions] = v
        k, v = cache.k[layer, :end], cache.v[layer, :end]
        k_pos = torch.arange(end, device=qkv.device)
    return attention(args, layer, q, k, v, positions, k_pos)


def residual_add(args: ModelArgs, weights, x: torch.Tensor, branch: torch.Tensor, post_norm: str | None) -> torch.Tensor:
    """x + branch, with Gemma's post-norm on the branch."""
    if post_norm is not None:
        branch = rms_norm(branch, weights[post_norm], args.norm_eps)
    return x + branch


def act_mul(args: ModelArgs, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return activation(args, gate) * up


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


def forward(
    args: ModelArgs,
    weights: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    linear: Linear | None = None,
    start_pos: int = 0,
    cache: KVCache | None = None,
) -> torch.Tensor:
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
