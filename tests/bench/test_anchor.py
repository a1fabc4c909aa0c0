"""bench/anchor.py computes the same model as our reference forward (`decdec.models.arch.forward`).

Tiny shapes, float32, on the CPU, uncompiled: the anchor decodes a sequence token by token through its
KV cache (written at a tensor position, read whole with a mask) and each step's logits must match the
reference's teacher-forced logits at that position. torch's int4 path (tinygemm) is CUDA-only: on a
GPU its kernel is checked against its definition (`check_int4`).
"""

import pytest
import torch

from bench.anchor import SHAPES, Anchor, Shapes, check_int4, padded_in, weight_bytes
from decdec.models.arch import ModelArgs, forward
from decdec.scheduler import latency

TINY = Shapes(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, vocab_size=50,
              norm_eps=1e-5, rope_base=10_000.0)


def reference_weights(model: Anchor) -> dict:
    """The anchor's weights under our canonical names (docs/FORMATS.md)."""
    w = {"embed": model.tok_embeddings.weight, "lm_head": model.output.weight, "norm": model.norm.weight}
    for i, b in enumerate(model.layers):
        p = f"layers.{i}."
        w |= {p + "attn_norm": b.attention_norm.weight, p + "ffn_norm": b.ffn_norm.weight,
              p + "qkv": b.attention.wqkv.weight, p + "o": b.attention.wo.weight,
              p + "gate_up": b.feed_forward.w13.weight, p + "down": b.feed_forward.w2.weight}
    return w


def test_anchor_matches_reference_forward():
    torch.manual_seed(0)
    model = Anchor(TINY, max_seq=16, dtype=torch.float32, device="cpu")
    for b in model.layers:  # norms away from 1, so a missing or misplaced norm weight shows
        b.attention_norm.weight.normal_(1.0, 0.2)
        b.ffn_norm.weight.normal_(1.0, 0.2)
    model.norm.weight.normal_(1.0, 0.2)
    args = ModelArgs("llama", TINY.vocab_size, TINY.dim, TINY.n_layers, TINY.n_heads, TINY.n_kv_heads,
                     TINY.head_dim, TINY.ffn_dim, TINY.norm_eps, TINY.rope_base, tied_embeddings=False)
    tokens = torch.randint(0, TINY.vocab_size, (12,))
    with torch.no_grad():
        want = forward(args, reference_weights(model), tokens)
        got = torch.cat([model(tokens[None, t:t + 1], torch.tensor([t]))[0] for t in range(len(tokens))])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_int4_construction_rejects_dense_dtype():
    with pytest.raises(ValueError, match="bfloat16"):
        Anchor(TINY, max_seq=8, quant="int4", dtype=torch.float32, device="cpu")


def test_weight_bytes():
    """Dense: 2 bytes a weight; int4: our 4-bit packing's count (codes, a 2-byte scale and zero per 128)
    of the inputs the int4 layer packs (SmolLM2's 576 zero-padded to 640)."""
    for name in ("llama3-8b", "smollm2-135m"):
        s = SHAPES[name]
        shapes = s.linear_shapes().values()
        lm_head = 2 * s.vocab_size * s.dim
        assert weight_bytes(s, None) == s.n_layers * sum(2 * o * i for o, i in shapes) + lm_head
        assert weight_bytes(s, "int4") == s.n_layers * sum(latency.weight_bytes(o, padded_in(i), 4)
                                                           for o, i in shapes) + lm_head
    assert padded_in(576) == 640 and padded_in(4096) == 4096 and padded_in(14336) == 14336


@pytest.mark.gpu
def test_int4_kernel_matches_its_definition():
    check_int4("cuda")
    for s in (Shapes(256, 1, 2, 1, 128, 256, 64), Shapes(576, 1, 9, 3, 64, 1536, 64)):  # 576: padded to 640
        model = Anchor(s, max_seq=8, quant="int4", device="cuda")
        logits = model(torch.tensor([[3]], device="cuda"), torch.tensor([0], device="cuda"))
        assert logits.shape == (1, 1, 64) and torch.isfinite(logits).all()
