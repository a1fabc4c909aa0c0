"""The end-to-end anchor: a gpt-fast-style decoder in plain PyTorch, what a user would run instead of us.

Llama-family blocks (RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU MLP) with fused qkv
and gate/up projections; the KV cache is module buffers (one static [1, KV, max_seq, hd] pair per
layer, written at a tensor position with `index_copy_`), and attention reads the whole cache with a
mask, so one compiled graph serves every position (grouped-query attention by SDPA's `enable_gqa`,
without copying the cache per query head). Linear layers are dense (`nn.Linear` in the model's
dtype) or torch's int4 kernel (`Int4Linear`: `_weight_int4pack_mm`, group 128, bf16 scales and
zeros); the lm_head is always dense. Weights are random (timing does not depend on their values).

    model = Anchor(SHAPES["llama3-8b"], max_seq=8192, quant="int4", device="cuda")
    step = compile_step(model)                # torch.compile(mode="reduce-overhead", fullgraph=True)
    logits = step(token [1, 1], position [1])  # [1, 1, vocab]

Nothing in the product imports this file; tests/bench/test_anchor.py checks that it computes the same
model as `decdec.models.arch.forward`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GROUP_SIZE = 128  # torch int4: one bf16 scale and zero per 128 inputs
INNER_K_TILES = 8  # tinygemm's packing (gpt-fast's choice); in_features must be a multiple of 16 x this
K_MULTIPLE = 16 * INNER_K_TILES  # = GROUP_SIZE: an int4 layer's inputs are zero-padded to a multiple of this


def padded_in(in_features: int) -> int:
    """Inputs an int4 layer packs: as gpt-fast's `WeightOnlyInt4Linear(padding=True)` does, a width the
    kernel cannot take (SmolLM2's 576) is zero-padded, here to the next multiple it can (640)."""
    return -(-in_features // K_MULTIPLE) * K_MULTIPLE


@dataclass(frozen=True)
class Shapes:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear layer of one block."""
        return {"qkv": (self.q_dim + 2 * self.kv_dim, self.dim), "o": (self.dim, self.q_dim),
                "gate_up": (2 * self.ffn_dim, self.dim), "down": (self.dim, self.ffn_dim)}


SHAPES = {
    "llama3-8b": Shapes(4096, 32, 32, 8, 128, 14336, 128256, 1e-5, 500_000.0),
    # Gemma 3 270M's shapes as Llama-family blocks: no QK norms, post-norms or sliding window
    "gemma3-270m": Shapes(640, 18, 4, 1, 256, 2048, 262144, 1e-6, 1_000_000.0),
    "smollm2-135m": Shapes(576, 30, 9, 3, 64, 1536, 49152, 1e-5, 100_000.0),
}


def weight_bytes(s: Shapes, quant: str | None, dtype_bytes: int = 2) -> int:
    """Bytes a decode step must read at least: every linear weight (int4 codes plus a scale and a zero
    per group of 128, or dense) and the dense lm_head."""
    total = dtype_bytes * s.vocab_size * s.dim
    for out_f, in_f in s.linear_shapes().values():
        dense = dtype_bytes * out_f * in_f
        k = padded_in(in_f)
        int4 = out_f * k // 2 + out_f * (k // GROUP_SIZE) * 2 * dtype_bytes
        total += s.n_layers * (int4 if quant == "int4" else dense)
    return total


# ----------------------------------------------------------------------------------------------------
# torch int4


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in / 2] with two 4-bit codes per byte (even input index in the high nibble), the
    layout `torch._convert_weight_to_int4pack` takes since torch 2.5."""
    return (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)


class Int4Linear(nn.Module):
    """y = x @ W^T through torch's int4 tinygemm kernel: W = (q - 8) * scale + zero per group of 128.
    Random codes; scales keep outputs about as large as the inputs. Inputs are zero-padded to
    `padded_in(in_features)` (the padded weight columns meet zeros)."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.out_features, self.pad = out_features, padded_in(in_features) - in_features
        k = in_features + self.pad
        codes = torch.randint(0, 16, (out_features, k), dtype=torch.int32, device=device)
        self.register_buffer("weight", torch._convert_weight_to_int4pack(pack_int4(codes), INNER_K_TILES))
        sz = torch.zeros(k // GROUP_SIZE, out_features, 2, dtype=torch.bfloat16, device=device)
        sz[..., 0] = 1 / (4.6 * math.sqrt(in_features))  # (q - 8) has std ~4.6
        self.register_buffer("scales_and_zeros", sz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (0, self.pad))
        y = torch._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.weight, GROUP_SIZE, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)


def check_int4(device) -> None:
    """torch's int4 kernel against its definition on a small random weight: an API or layout that
    changed between torch versions fails here, loudly, before anything is timed."""
    gen = torch.Generator(device=device).manual_seed(0)
    out_f, in_f = 256, 2 * GROUP_SIZE
    codes = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32, device=device, generator=gen)
    sz = torch.rand(in_f // GROUP_SIZE, out_f, 2, device=device, generator=gen).to(torch.bfloat16)
    x = torch.randn(1, in_f, device=device, generator=gen).to(torch.bfloat16)
    packed = torch._convert_weight_to_int4pack(pack_int4(codes), INNER_K_TILES)
    got = torch._weight_int4pack_mm(x, packed, GROUP_SIZE, sz).float()
    per_input = sz.float().repeat_interleave(GROUP_SIZE, dim=0)  # [in, out, 2]
    w = (codes.T.float() - 8) * per_input[..., 0] + per_input[..., 1]  # [in, out]
    want = x.float() @ w
    err = ((got - want).abs().max() / want.abs().max()).item()
    if not err < 0.02:
        raise RuntimeError(f"torch {torch.__version__}: _weight_int4pack_mm(x, _convert_weight_to_int4pack(codes, "
                           f"{INNER_K_TILES}), {GROUP_SIZE}, scales_and_zeros) is not x @ ((q - 8) * scale + zero)^T "
                           f"(relative error {err:.3g}): the int4 API changed, fix bench/anchor.py")


# ----------------------------------------------------------------------------------------------------
# the model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, heads, T, hd] with cos / sin [T, hd], in float32."""
    xf = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], -1)
    return (xf * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, s: Shapes, max_seq: int, linear, dtype, device):
        super().__init__()
        self.s = s
        self.wqkv = linear(s.dim, s.q_dim + 2 * s.kv_dim)
        self.wo = linear(s.q_dim, s.dim)
        cache = (1, s.n_kv_heads, max_seq, s.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache, dtype=dtype, device=device))
        self.register_buffer("v_cache", torch.zeros(cache, dtype=dtype, device=device))

    def forward(self, x, cos, sin, pos, mask):
        s, (b, t, _) = self.s, x.shape
        q, k, v = self.wqkv(x).split([s.q_dim, s.kv_dim, s.kv_dim], dim=-1)
        q = q.view(b, t, s.n_heads, s.head_dim).transpose(1, 2)
        k = k.view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        # grouped-query attention inside SDPA: gpt-fast's repeat_interleave of the whole cache cost 3 ms a
        # step more at max_seq 8192 (Llama-3-8B shapes, H100: int4 6.62 against 3.55 ms of device time)
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, s.q_dim))


class FeedForward(nn.Module):
    def __init__(self, s: Shapes, linear):
        super().__init__()
        self.w13 = linear(s.dim, 2 * s.ffn_dim)  # gate, then up
        self.w2 = linear(s.ffn_dim, s.dim)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, s: Shapes, max_seq: int, linear, dtype, device):
        super().__init__()
        self.attention_norm = RMSNorm(s.dim, s.norm_eps, dtype, device)
        self.attention = Attention(s, max_seq, linear, dtype, device)
        self.ffn_norm = RMSNorm(s.dim, s.norm_eps, dtype, device)
        self.feed_forward = FeedForward(s, linear)

    def forward(self, x, cos, sin, pos, mask):
        x = x + self.attention(self.attention_norm(x), cos, sin, pos, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Anchor(nn.Module):
    """The decoder: forward(tokens [B, T], pos [T]) -> logits [B, T, vocab] in `dtype`, writing the KV
    cache at `pos` and attending to every cached position <= its own.

    quant: None (dense linear layers in `dtype`) or "int4" (torch's int4 kernel, bf16 only)."""

    def __init__(self, s: Shapes, max_seq: int, quant: str | None = None, dtype=torch.bfloat16, device="cuda"):
        super().__init__()
        if quant not in (None, "int4"):
            raise ValueError(f"quant must be None or 'int4', got {quant!r}")
        if quant == "int4" and dtype != torch.bfloat16:
            raise ValueError("torch's int4 kernel takes bfloat16 activations")

        def linear(in_f: int, out_f: int) -> nn.Module:
            if quant == "int4":
                return Int4Linear(in_f, out_f, device)
            layer = nn.Linear(in_f, out_f, bias=False, dtype=dtype, device=device)
            nn.init.normal_(layer.weight, std=in_f ** -0.5)
            return layer

        self.s, self.max_seq = s, max_seq
        self.tok_embeddings = nn.Embedding(s.vocab_size, s.dim, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Block(s, max_seq, linear, dtype, device) for _ in range(s.n_layers))
        self.norm = RMSNorm(s.dim, s.norm_eps, dtype, device)
        self.output = nn.Linear(s.dim, s.vocab_size, bias=False, dtype=dtype, device=device)
        nn.init.normal_(self.output.weight, std=s.dim ** -0.5)
        inv_freq = 1.0 / (s.rope_base ** (torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim))
        angles = torch.arange(max_seq, device=device).float()[:, None] * inv_freq[None, :]
        self.register_buffer("rope_cos", torch.cat([angles.cos(), angles.cos()], -1))  # [max_seq, hd] float32
        self.register_buffer("rope_sin", torch.cat([angles.sin(), angles.sin()], -1))
        self.register_buffer("k_pos", torch.arange(max_seq, device=device))
        self.requires_grad_(False)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        mask = self.k_pos[None, :] <= pos[:, None]  # [T, max_seq]: every cached position up to its own
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, pos, mask)
        return self.output(self.norm(x))


def compile_step(model: Anchor):
    """The decode step as gpt-fast compiles it: one CUDA graph per step, no graph breaks allowed."""
    return torch.compile(model, mode="reduce-overhead", fullgraph=True)
