"""The robust quantizer on real layers of a packaged model, and the off-domain evaluation text."""

from pathlib import Path

import pytest
import torch

from decdec.config import load_config
from decdec.errors import ConfigError
from decdec.models.corpus import PYSOURCE_MODULES, check_disjoint, corpus_text, token_windows
from decdec.models.quantize import quantize_robust, quantize_rtn
from decdec.models.residual import build_residual, effective_weight
from decdec.ops import selector


@pytest.fixture(scope="module")
def smollm_layers():
    """Weights and calibration activations of the four linear groups of SmolLM2-135M's last layer."""
    from decdec.models.calibrate import collect_activations
    from decdec.models.loader import load_model

    model = load_model("smollm2-135m")
    window = token_windows(model.tokenizer, corpus_text("pydoc", "calibration"), 256, 256)[:1]
    acts = collect_activations(model.args, model.weights, window)
    last = model.args.n_layers - 1
    return [(model.weights[f"layers.{l}.{kind}"], x) for (l, kind), x in acts.items() if l == last]


def _held_error(q, weight: torch.Tensor, x: torch.Tensor, k_chunk: int) -> float:
    """Output error on x of the layer as DecDEC runs it at k_chunk (the 4-bit residual table, the
    selector's exact top-k), against the full-precision layer."""
    xs = x * q.act_scale
    y = xs @ q.dequantize().T
    if k_chunk:
        mask = selector.selection_mask(selector.select_exact(xs, k_chunk), xs.shape[-1])
        y = y + (xs * mask) @ build_residual(effective_weight(weight, q), q).dequantize().T
    return (y - x @ weight.T).square().sum().item()


@pytest.mark.parametrize("k_chunk", [0, 32])
def test_robust_never_worse_than_rtn_on_held_back_rows(smollm_layers, k_chunk):
    better = 0
    for weight, x in smollm_layers:
        held = x[-(x.shape[0] // 4):]  # the rows the quantizer holds back from its searches
        q, table = quantize_robust(weight, x, 3, k_chunk=k_chunk)
        robust = _held_error(q, weight, held, k_chunk)
        rtn = _held_error(quantize_rtn(weight, 3), weight, held, k_chunk)
        assert robust <= rtn * (1 + 1e-5)
        better += robust < 0.99 * rtn
        if table is not None:  # the table it scored with is the one prepare would build, bit for bit
            built = build_residual(effective_weight(weight, q), q)
            assert torch.equal(table.rows, built.rows) and torch.equal(table.scales, built.scales)
    assert better >= len(smollm_layers) // 2  # it does choose something other than RTN on real layers


def test_pysource_is_fixed_stdlib_source():
    text = corpus_text("pysource", "eval")
    assert text == corpus_text("pysource", "calibration")  # no halves: the whole text
    assert "def bisect_right(" in text and "class Fraction(" in text and len(PYSOURCE_MODULES) == 8
    assert len(text) > 100_000  # room for 8192 evaluation tokens


def test_pysource_for_both_calibration_and_eval_is_refused():
    with pytest.raises(ConfigError, match="must not overlap"):
        check_disjoint("pysource", "pysource")
    check_disjoint("pydoc", "pysource")
    check_disjoint("pysource", "pydoc")


def test_off_domain_eval_windows():
    from decdec.models.loader import load_model
    from decdec.models.prepare import Prepared
    from decdec.runtime.evaluate import eval_windows

    model = load_model("smollm2-135m")
    cfg = load_config({"model": {"source": "smollm2-135m"}, "eval": {"corpus": "pysource", "tokens": 300, "ctx": 128}})
    windows = eval_windows(Prepared(model, {}, [], cfg, Path(".")))
    assert len(windows) >= 2 and windows[0].shape[0] == 128
    assert '"""Bisection algorithms."""' in model.tokenizer.decode(windows[0].tolist())


def test_robust_artifacts_depend_on_k_chunk():
    from types import SimpleNamespace

    from decdec.models.prepare import artifact_key

    model = SimpleNamespace(sha256="0" * 64)
    keys = [artifact_key(model, load_config({"quant": {"method": "robust"}, "decdec": {"k_chunk": k}})) for k in (8, 32)]
    assert keys[0] != keys[1]
    off = load_config({"quant": {"method": "robust"}, "decdec": {"k_chunk": 32, "selection": "none"}})
    assert off.quant_k_chunk() == 0


def test_prepare_robust_keys_artifacts_by_k_chunk(tmp_path):
    from decdec.errors import ArtifactError
    from decdec.models.prepare import prepare

    tiny = {"family": "llama", "vocab_size": 200, "dim": 64, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
            "head_dim": 32, "ffn_dim": 128, "max_seq_len": 64}
    cfg = {"model": {"source": {"synthetic": tiny}}, "calibration": {"tokens": 64, "ctx": 32},
           "decdec": {"k_chunk": 256}, "artifacts": str(tmp_path / "art")}
    assert load_config(cfg).quant.method == "robust"  # the default quantizer
    first = prepare(cfg, progress=False)
    again = prepare(cfg, progress=False)  # reused: same model, config and k_chunk
    assert torch.equal(first.groups[0, "qkv"].q.qweight, again.groups[0, "qkv"].q.qweight)
    with pytest.raises(ArtifactError):  # planned for another k_chunk: not silently reused
        prepare({**cfg, "decdec": {"k_chunk": 128}}, progress=False)
