"""engine.step() token by token gives the logits of the batch simulation that perplexity uses.

Tolerance: the step computes R_hat[:, idx] @ x[idx] and the simulation (x * mask) @ R_hat^T, the
same float32 terms summed in another order, so logits agree to ~1e-6 relative; we require
max |diff| <= 1e-4 * max |logit|. The selections themselves must be identical.
"""

import pytest
import torch

from decdec import runtime
from decdec.models.arch import LINEAR_KINDS, forward
from decdec.errors import ConfigError, InputError
from decdec.runtime.engine import text_pieces
from decdec.runtime.evaluate import decdec_linear, dense_groups

TINY = {"family": "llama", "vocab_size": 300, "dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
        "head_dim": 32, "ffn_dim": 1536, "max_seq_len": 64}


def tiny_cfg(tmp_path, k_chunk=64, selection="bucket", family="llama", method="rtn"):
    spec = {**TINY, "family": family}
    if family == "gemma3":
        spec.update(sliding_window=4, sliding_pattern=2)
    return {
        "model": {"source": {"synthetic": spec}, "max_seq_len": 64},
        "quant": {"method": method, "bits": 3},
        "decdec": {"k_chunk": k_chunk, "selection": selection},
        "calibration": {"tokens": 128, "ctx": 32},
        "artifacts": str(tmp_path / "art"),
    }


def step_logits(engine, tokens) -> torch.Tensor:
    engine.reset()
    return torch.stack([engine.step(int(t)) for t in tokens])


def assert_close_logits(got, want):
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * want.abs().max().item(), f"max |logit diff| {err}"


@pytest.mark.parametrize("family,method", [("llama", "rtn"), ("gemma3", "awq")])
def test_step_equals_batch_simulation(tmp_path, family, method):
    engine = runtime.compile(tiny_cfg(tmp_path, family=family, method=method), progress=False)
    tokens = torch.randint(0, TINY["vocab_size"], (24,), generator=torch.Generator().manual_seed(4))
    p = engine.prepared
    groups = dense_groups(p)
    sim = forward(p.model.args, p.model.weights, tokens, decdec_linear(groups, "bucket", 64))
    assert_close_logits(step_logits(engine, tokens), sim)
    base = forward(p.model.args, p.model.weights, tokens, decdec_linear(groups, "none"))
    assert (sim - base).abs().max() > 1e-3, "compensation changed nothing: the test would prove nothing"


def test_simulation_takes_k_chunk_per_group(tmp_path):
    """A tuned engine's per-(kind, bits) k_chunk simulates group by group."""
    engine = runtime.compile(tiny_cfg(tmp_path, family="llama", method="rtn"), progress=False)
    p = engine.prepared
    groups = dense_groups(p)
    tokens = torch.randint(0, TINY["vocab_size"], (12,), generator=torch.Generator().manual_seed(6))
    run = lambda k: forward(p.model.args, p.model.weights, tokens, decdec_linear(groups, "bucket", k))  # noqa: E731
    bits = p.layer_bits
    assert (run({(kind, bits[0]): 64 for kind in LINEAR_KINDS}) == run(64)).all()
    only_down = {(kind, bits[0]): 64 if kind == "down" else 0 for kind in LINEAR_KINDS}
    mixed, base, every = run(only_down), run(0), run(64)
    assert (mixed - base).abs().max() > 0 and (mixed - every).abs().max() > 0


def test_step_without_decdec_equals_quantized_model(tmp_path):
    engine = runtime.compile(tiny_cfg(tmp_path, selection="none"), progress=False)
    assert not any(n.op == "selector" for n in engine.graph.nodes)
    tokens = torch.randint(0, TINY["vocab_size"], (10,), generator=torch.Generator().manual_seed(5))
    p = engine.prepared
    want = forward(p.model.args, p.model.weights, tokens, decdec_linear(dense_groups(p), "none"))
    assert_close_logits(step_logits(engine, tokens), want)


def test_int8_lm_head_is_what_every_cpu_path_multiplies_by(tmp_path):
    """quant.lm_head_bits 8: the prepared model's lm_head is the int8 codes' dequantized weight (the
    embedding untied from it and unchanged), the artifacts are the fp16 config's, and the step's
    logits change by the quantization only."""
    from decdec.models.prepare import artifact_folder
    from decdec.ops.lm_head import dequantize_rows

    cfg = tiny_cfg(tmp_path, family="gemma3")  # tied embeddings
    fp16 = runtime.compile(cfg, progress=False)
    int8 = runtime.compile({**cfg, "quant": {**cfg["quant"], "lm_head_bits": 8}}, progress=False)
    p, loaded = int8.prepared, fp16.prepared.model
    assert p.reused and artifact_folder(loaded, p.config) == fp16.prepared.folder
    codes, scale = p.lm_head_int8
    assert codes.dtype == torch.uint8 and (p.model.weights["lm_head"] == dequantize_rows(codes, scale)).all()
    assert torch.equal(p.model.weights["embed"], loaded.weights["embed"]) and loaded.weights["lm_head"] is loaded.weights["embed"]
    assert fp16.prepared.lm_head_int8 is None
    tokens = torch.randint(0, TINY["vocab_size"], (8,), generator=torch.Generator().manual_seed(9))
    want = forward(p.model.args, p.model.weights, tokens, decdec_linear(dense_groups(p), "bucket", 64))
    got, plain = step_logits(int8, tokens), step_logits(fp16, tokens)
    assert_close_logits(got, want)
    assert 0 < (got - plain).abs().max() < 0.05 * plain.abs().max()


def test_prefill_then_steps_continue_the_sequence(tmp_path):
    engine = runtime.compile(tiny_cfg(tmp_path, selection="none"), progress=False)
    tokens = torch.randint(0, TINY["vocab_size"], (12,), generator=torch.Generator().manual_seed(6))
    full = step_logits(engine, tokens)
    engine.reset()
    pre = engine.prefill(tokens[:8])
    rest = torch.stack([engine.step(int(t)) for t in tokens[8:]])
    assert_close_logits(torch.cat([pre, rest]), full)


def test_graph_has_selector_dma_correction_per_group(tmp_path):
    engine = runtime.compile(tiny_cfg(tmp_path), progress=False)
    ops = [n.op for n in engine.graph.nodes if n.layer == 0]
    assert ops.count("selector") == ops.count("dma") == ops.count("correction") == 4  # qkv, o, gate_up, down
    ops = {n.op for launch in engine.plan.launches for n in launch.nodes}  # the CPU runs every logical op
    assert {"selector", "dma", "correction", "merge"} <= ops
    assert all(launch.attr("k_chunk") == 64 for launch in engine.plan.launches if launch.op == "selector")


def test_sequence_longer_than_cache_is_a_clear_error(tmp_path):
    engine = runtime.compile(tiny_cfg(tmp_path, selection="none"), progress=False)
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len = 64"):
        engine.prefill(list(range(65)))


def test_exact_selection_is_not_an_engine_mode(tmp_path):
    with pytest.raises(ConfigError, match="'decdec.selection' = 'exact' is an evaluation baseline"):
        runtime.compile(tiny_cfg(tmp_path, selection="exact"), progress=False)


def test_target_slowdown_needs_the_gpu(tmp_path):
    """The tuner spends the target on a GPU's measured latency model: on the CPU it is one clear error,
    raised before any preparation."""
    cfg = {**tiny_cfg(tmp_path), "decdec": {"target_slowdown": 0.05}}
    with pytest.raises(ConfigError, match="'decdec.target_slowdown' = 0.05 needs device 'cuda'.*set 'decdec.k_chunk'"):
        runtime.compile(cfg, progress=False)
    assert not (tmp_path / "art").exists()


@pytest.mark.slow
def test_step_equals_simulation_on_gemma3(tmp_path):
    """The real default model, 3-bit RTN (quick to prepare), first 64 positions of eval text."""
    cfg = {"model": {"source": "gemma3-270m", "max_seq_len": 128}, "quant": {"method": "rtn", "bits": 3},
           "decdec": {"k_chunk": 32}, "calibration": {"tokens": 256, "ctx": 128}, "artifacts": str(tmp_path / "g")}
    engine = runtime.compile(cfg, progress=False)
    from decdec.models.corpus import corpus_text

    tokens = torch.tensor(engine.tokenizer.encode(corpus_text("pydoc", "eval")[:2000]))[:64]
    p = engine.prepared
    sim = forward(p.model.args, p.model.weights, tokens, decdec_linear(dense_groups(p), "bucket", 32))
    assert_close_logits(step_logits(engine, tokens), sim)


@pytest.mark.parametrize("call,message", [
    (lambda e: e.step(300), r"token 300 is not a token id of this model: allowed 0 .. 299"),
    (lambda e: e.step(5000), r"token 5000 is not a token id"),
    (lambda e: e.step(-1), r"token -1 is not a token id"),
    (lambda e: e.step(2.5), r"token 2.5 is not an integer token id"),
    (lambda e: e.prefill([]), r"at least one token id, got an empty prompt"),
    (lambda e: e.prefill([5, 300, 7]), r"token 300 \(at index 1\) is not a token id"),
    (lambda e: e.prefill(torch.tensor([1.0, 2.0])), r"token ids must be integers"),
    (lambda e: e.tokens([1, 2], max_new_tokens=-1), r"max_new_tokens = -1: allowed 0 or more"),
    (lambda e: e.tokens([1, 2], temperature=-1.0), r"temperature = -1.0: allowed 0 or more"),
])
def test_bad_inputs_are_one_clear_error(tmp_path, call, message):
    engine = runtime.compile(tiny_cfg(tmp_path, selection="none"), progress=False)
    with pytest.raises(InputError, match=message):
        call(engine)
    assert engine.position == 0  # nothing entered the cache
    engine.step(torch.tensor(299))  # the last id, as a one-element tensor, is fine


@pytest.fixture(scope="module")
def text_engine(tmp_path_factory):
    from tests.runtime.tiny_hf import tiny_hf_cfg, tiny_hf_folder

    tmp = tmp_path_factory.mktemp("hf")
    return runtime.compile(tiny_hf_cfg(tiny_hf_folder(tmp / "model"), tmp / "art"), progress=False)


def test_tokens_stream_as_they_are_decoded(text_engine):
    engine = text_engine
    engine.reset()
    prompt = engine.tokenizer.encode("Hello")
    stream = engine.tokens(prompt, max_new_tokens=5)
    assert engine.position == len(prompt)  # prefilled at once: a bad prompt fails before the first next()
    first = next(stream)
    assert engine.position == len(prompt)  # the first token came out before any decode step ran
    rest = list(stream)
    assert engine.position == len(prompt) + 1 + len(rest)  # every yielded token entered the cache
    engine.reset()
    assert [first, *rest] == list(engine.tokens(prompt, max_new_tokens=5, stop=()))
    engine.reset()
    assert list(engine.tokens(prompt, max_new_tokens=5, stop=[first])) == []  # a stop id ends it


def test_stream_pieces_add_up_to_generate(text_engine):
    ids: list[int] = []
    pieces = list(text_engine.stream("Hello", max_new_tokens=6, ids=ids))
    assert len(ids) == 6
    assert "".join(pieces) == text_engine.generate("Hello", max_new_tokens=6) == text_engine.tokenizer.decode(ids)
    with pytest.raises(InputError, match="prompt must be a non-empty string"):
        text_engine.stream("")


def test_text_pieces_wait_for_a_whole_character(text_engine):
    tok = text_engine.tokenizer
    ids = tok.encode("aé b")
    assert len(ids) == 5  # byte-level: 'é' is two tokens
    pieces = list(text_pieces(tok, iter(ids)))
    assert pieces == ["a", "é", " ", "b"]


def test_generate_needs_a_tokenizer(tmp_path):
    engine = runtime.compile(tiny_cfg(tmp_path, selection="none"), progress=False)
    with pytest.raises(ConfigError, match="no tokenizer"):
        engine.generate("hi")
