"""The real packaged GGUF models: our forward agrees with transformers' own GGUF loading, and a
user's GGUF file given by path runs through prepare and eval with no code change."""

import json

import pytest
import yaml

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma3-270m", "smollm2-135m"])
def test_forward_agrees_with_transformers_gguf(model):
    from bench.parity import parity

    r = parity(model, n_tokens=48)
    assert r["top1_agreement"] == 1.0
    assert r["max_abs_logit_diff"] < 1e-3 * r["max_abs_logit"]


@pytest.mark.slow
def test_user_gguf_path_runs_prepare_and_eval(tmp_path):
    from decdec.models.loader import PACKAGED
    from decdec.runtime.cli import main

    path = PACKAGED["smollm2-135m"]()  # any supported GGUF file, given by its path
    cfg = {"model": {"source": str(path)}, "quant": {"method": "rtn", "bits": 3},
           "calibration": {"tokens": 128, "ctx": 64}, "eval": {"tokens": 64, "ctx": 64},
           "artifacts": str(tmp_path / "art")}
    cfg_file = tmp_path / "mine.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    assert main(["prepare", str(cfg_file)]) == 0
    out = tmp_path / "rows.json"
    assert main(["eval", str(cfg_file), "--k-chunk", "0,64", "--selection", "bucket", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["reference", "rtn", "rtn"]
    assert rows[0]["ppl"] < rows[1]["ppl"]  # 3-bit RTN is worse than the reference


def test_unsupported_gguf_architecture_is_named(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from decdec.models.loader import load_model
    from decdec.errors import UnsupportedModelError

    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=r"GGUF architecture 'phi3' is not supported: supported are \['llama', 'qwen2', 'gemma3'\]"):
        load_model(str(path))
