"""Our forward equals transformers' on tiny random models of each family, loaded from HF folders.

Tolerance: both sides compute in float32 on the CPU, so logits agree to ~1e-5 relative;
we require max |diff| <= 1e-4 * max |logit| (plus 1e-5 absolute).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from decdec.models.arch import KVCache, forward  # noqa: E402
from decdec.models.loader import load_hf_folder, synthetic_model  # noqa: E402
from decdec.errors import ModelFileError, UnsupportedModelError  # noqa: E402

COMMON = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)


def tiny_config(family: str):
    if family == "llama":
        return transformers.LlamaConfig(**COMMON, rms_norm_eps=1e-5, rope_theta=10_000.0, tie_word_embeddings=False)
    if family == "qwen2":
        return transformers.Qwen2Config(**COMMON, rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            **COMMON, head_dim=32, rms_norm_eps=1e-6, sliding_window=5, sliding_window_pattern=2,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        )
    raise ValueError(family)


def hf_model(family: str, seed: int):
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cls = transformers.Gemma3ForCausalLM if family == "gemma3" else transformers.AutoModelForCausalLM
    model = cls.from_config(cfg) if cls is transformers.AutoModelForCausalLM else cls(cfg)
    with torch.no_grad():  # HF initialises norms to constants and biases to 0: randomise everything
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.1))
    return model.eval().float()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_forward_matches_transformers(family, tmp_path):
    model = hf_model(family, seed=len(family))
    model.save_pretrained(tmp_path)
    ours = load_hf_folder(tmp_path)
    assert ours.args.family == family
    tokens = torch.randint(0, COMMON["vocab_size"], (12,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = model(tokens[None]).logits[0]
        mine = forward(ours.args, ours.weights, tokens)
    err = (mine - theirs).abs().max().item()
    assert err <= 1e-4 * theirs.abs().max().item() + 1e-5, f"{family}: max |logit diff| = {err}"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cached_decode_equals_full_forward(family, tmp_path):
    """Prefill then token-by-token steps through the KV cache give the teacher-forced logits."""
    hf_model(family, seed=3).save_pretrained(tmp_path)
    m = load_hf_folder(tmp_path)
    tokens = torch.randint(0, COMMON["vocab_size"], (11,), generator=torch.Generator().manual_seed(9))
    full = forward(m.args, m.weights, tokens)
    cache = KVCache.allocate(m.args, 16)
    steps = [forward(m.args, m.weights, tokens[:4], cache=cache)]
    steps += [forward(m.args, m.weights, tokens[t : t + 1], start_pos=t, cache=cache) for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-4, atol=1e-4)


def test_shape_mismatch_is_a_clear_error(tmp_path):
    model = hf_model("llama", seed=1)
    model.config.intermediate_size = 100  # the checkpoint's tensors say 96
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelFileError, match=r"has shape \(192, 64\), but the model's config implies \(200, 64\)"):
        load_hf_folder(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mamba"}')
    with pytest.raises(UnsupportedModelError, match="model_type 'mamba' is not supported"):
        load_hf_folder(tmp_path)


def test_corrupt_safetensors(tmp_path):
    hf_model("llama", seed=2).save_pretrained(tmp_path)
    f = next(tmp_path.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ModelFileError, match="corrupt or unreadable safetensors"):
        load_hf_folder(tmp_path)


def test_synthetic_model_runs():
    m = synthetic_model({"family": "gemma3", "vocab_size": 50, "dim": 32, "n_layers": 2, "n_heads": 2,
                         "n_kv_heads": 1, "head_dim": 16, "ffn_dim": 48, "sliding_window": 4, "sliding_pattern": 2})
    logits = forward(m.args, m.weights, torch.tensor([1, 2, 3]))
    assert logits.shape == (3, 50) and torch.isfinite(logits).all()
