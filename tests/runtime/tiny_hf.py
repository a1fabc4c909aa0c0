"""A tiny random Llama as a Hugging Face folder with a byte-level tokenizer and a ChatML chat template:
what the generation, streaming and chat tests need (a synthetic model has no tokenizer)."""

import json
from pathlib import Path

import pytest

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_hf_folder(path: Path, seed: int = 0, ascii_only: bool = False) -> Path:
    """`ascii_only`: a vocabulary of the printable ASCII bytes and newline, so that whatever the random
    model writes decodes to text that encodes back to the same ids."""
    transformers = pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if ascii_only:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = {piece for piece, _ in byte_level.pre_tokenize_str("".join(map(chr, range(32, 127))) + "\n")}
        alphabet = {c for piece in alphabet for c in piece}
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL)
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|endoftext|>", "add_bos_token": False, "chat_template": CHATML}))
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.1))
    model.save_pretrained(path)
    return path


def tiny_hf_cfg(folder: Path, artifacts: Path, k_chunk: int = 256) -> dict:
    return {"model": {"source": str(folder), "max_seq_len": 256}, "quant": {"method": "rtn", "bits": 3},
            "decdec": {"k_chunk": k_chunk}, "calibration": {"tokens": 64, "ctx": 32},
            "eval": {"tokens": 64, "ctx": 32}, "artifacts": str(artifacts)}
