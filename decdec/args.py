"""ModelArgs: the shapes and flags of a decoder-only model (Llama, Qwen2, Gemma 3), which every layer
reads: the families in `decdec.models`, the ops' kernels and references, the scheduler's shapes.
Plain data; imports nothing of ours."""

from __future__ import annotations

from dataclasses import dataclass

from decdec.constants import LINEAR_KINDS

FAMILIES = ("llama", "qwen2", "gemma3")


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

    def rope_base_of(self, layer: int) -> float:
        """The RoPE base of a layer: Gemma 3's sliding layers use their own."""
        return self.rope_local_base if self.is_sliding(layer) else self.rope_base

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
        layer = {"attn_norm": (self.dim,), "ffn_norm": (self.dim,), **{k: self.linear_shape(k) for k in LINEAR_KINDS}}
        if self.qkv_bias:
            layer["qkv_bias"] = self.linear_shape("qkv")[:1]
        if self.is_gemma:
            layer.update(q_norm=(self.head_dim,), k_norm=(self.head_dim,), post_attn_norm=(self.dim,),
                         post_ffn_norm=(self.dim,))
        shapes = {"embed": (self.vocab_size, self.dim), "lm_head": (self.vocab_size, self.dim), "norm": (self.dim,)}
        for i in range(self.n_layers):
            shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
        return shapes
