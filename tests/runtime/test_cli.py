"""The CLI end to end on a tiny synthetic model, and bad input turned into one clear error."""

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from decdec.runtime.cli import main
from decdec.config import load_config
from decdec.errors import ConfigError

TINY = {"family": "llama", "vocab_size": 200, "dim": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
        "head_dim": 32, "ffn_dim": 128, "max_seq_len": 64}


@pytest.fixture
def cfg_file(tmp_path):
    cfg = {"model": {"source": {"synthetic": TINY}, "max_seq_len": 64}, "quant": {"method": "rtn", "bits": 3},
           "decdec": {"k_chunk": 256}, "calibration": {"tokens": 64, "ctx": 32}, "eval": {"tokens": 64, "ctx": 32},
           "artifacts": str(tmp_path / "art")}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_prepare_eval_graph_profile(cfg_file, tmp_path, capsys):
    assert main(["prepare", str(cfg_file)]) == 0
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(cfg_file), "--k-chunk", "0,128", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["method"], r["selection"], r["k_chunk"]) for r in rows] == [
        ("reference", "none", 0), ("rtn", "none", 0), ("rtn", "bucket", 128), ("rtn", "exact", 128), ("rtn", "static", 128)]
    assert all(r["ppl"] > 1 and r["tokens"] == 64 for r in rows)  # exactly eval.tokens
    assert rows[0]["bits"] == 32  # the reference runs the float32 weights
    assert main(["graph", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    assert "L0.qkv.rms_norm+selector" in out and "side" in out
    trace = tmp_path / "trace.json"
    assert main(["profile", str(cfg_file), "--steps", "3", "--trace", str(trace), "--eager"]) == 0
    out = capsys.readouterr().out
    assert "summary by op type" in out and "profiled step" in out and "plain step" in out
    assert "eager step: not timed" in out  # the CPU step has no graph: it already runs op by op
    shares = [float(line.split()[-1][:-1]) for line in out.splitlines() if line.endswith("%")]
    assert 97 <= sum(shares) <= 100.5  # CPU ops run one after another: they fill the step but for the timer
    events = json.loads(trace.read_text())["traceEvents"]
    ops = [e for e in events if e["ph"] == "X"]
    assert {e["tid"] for e in ops} == {0}  # the CPU runs the unfused plan on one stream
    assert {"selector", "dma", "correction", "merge"} <= {e["cat"] for e in ops}  # every logical op, timed


BAD_CONFIGS = [
    ({"quant": {"bitz": 3}}, "unknown config field 'bitz' in section 'quant'"),
    ({"quant": {"bits": 2}}, r"'quant.bits' = 2 is not allowed: allowed are \[3, 4, 3.5\]"),
    ({"decdec": {"k_chunk": 4096}}, r"'decdec.k_chunk' = 4096 is out of range: allowed 0 .. 1024"),
    ({"decdec": {"k_chunk": "many"}}, "'decdec.k_chunk' = 'many' has the wrong type"),
    ({"decdec": {"target_slowdown": -0.1}}, "'decdec.target_slowdown' = -0.1 is out of range"),
    ({"decdec": {"device_profile": 3}}, "'decdec.device_profile' = 3 has the wrong type"),
    ({"device": "tpu"}, "'device' = 'tpu' is not allowed"),
    ({"eval": "lots"}, "section 'eval' must be a mapping"),
]


@pytest.mark.parametrize("cfg,message", BAD_CONFIGS)
def test_bad_config_fields(cfg, message):
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def test_bad_yaml_and_missing_model_print_one_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    assert main(["prepare", str(bad)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"model": {"source": str(tmp_path / "nope.gguf")}}))
    assert main(["prepare", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model source") and "not found" in err and "Traceback" not in err


def test_k_chunk_out_of_range_on_the_command_line(cfg_file, capsys):
    assert main(["eval", str(cfg_file), "--k-chunk", "0,2048"]) == 2
    assert "--k-chunk 2048 is out of range: allowed 0 .. 1024" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")
def test_tune_without_a_gpu_is_one_clear_error(cfg_file, capsys):
    assert main(["tune", str(cfg_file), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err == "error: `decdec tune` measures this machine's GPU, but no CUDA device is available here\n"


def test_graph_with_a_target_on_the_cpu_is_one_clear_error(tmp_path, capsys):
    cfg = {"model": {"source": {"synthetic": TINY}}, "decdec": {"target_slowdown": 0.05}}
    path = tmp_path / "target.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["graph", str(path)]) == 2
    assert "'decdec.target_slowdown' = 0.05 needs device 'cuda'" in capsys.readouterr().err


def test_mismatched_artifacts_are_refused(cfg_file, capsys):
    assert main(["prepare", str(cfg_file)]) == 0
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["quant"]["bits"] = 4  # same artifact folder, another config
    cfg_file.write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(cfg_file), "--k-chunk", "0"]) == 2
    assert "were made with quant = " in capsys.readouterr().err


def test_corrupt_artifacts_are_refused(cfg_file, tmp_path, capsys):
    assert main(["prepare", str(cfg_file)]) == 0
    f = tmp_path / "art" / "residuals.safetensors"
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    assert main(["eval", str(cfg_file), "--k-chunk", "0"]) == 2
    assert "is corrupt (sha256 differs from the manifest)" in capsys.readouterr().err


def test_interrupted_prepare_leaves_nothing_trusted(cfg_file, tmp_path, monkeypatch, capsys):
    from decdec.models import artifacts

    assert main(["prepare", str(cfg_file)]) == 0
    written = []

    def crash(tensors, path):  # the second file of a forced rebuild: Ctrl-C
        if written:
            raise KeyboardInterrupt
        written.append(path)
        save_file(tensors, path)

    monkeypatch.setattr(artifacts, "save_file", crash)
    assert main(["prepare", str(cfg_file), "--force"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    folder = tmp_path / "art"
    assert not (folder / "manifest.json").exists()  # the old one went before the first file changed
    assert not list(folder.glob("*.tmp"))
    monkeypatch.undo()
    assert main(["prepare", str(cfg_file)]) == 0  # rebuilt, not refused
    assert "artifacts ready" in capsys.readouterr().out


BAD_FLAGS = [
    (["eval", "--ctx", "0"], "--ctx 0 is out of range: allowed 2 or more"),
    (["eval", "--ctx", "1"], "--ctx 1 is out of range: allowed 2 or more"),
    (["eval", "--max-tokens", "0"], "--max-tokens 0 is out of range: allowed 1 or more"),
    (["run", "--max-new-tokens", "-1"], "--max-new-tokens -1 is out of range: allowed 1 or more"),
    (["run", "--ppl-tokens", "-5"], "--ppl-tokens -5 is out of range: allowed 0 or more"),
    (["chat", "--max-new-tokens", "0"], "--max-new-tokens 0 is out of range: allowed 1 or more"),
    (["profile", "--steps", "0"], "--steps 0 is out of range: allowed 1 or more"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS)
def test_bad_counts_are_one_error_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DECDEC_CACHE", str(tmp_path / "cache"))
    assert main(argv) == 2  # the default model: nothing is loaded before the flags are checked
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("manifest,message", [
    ({"format_version": 1}, "field 'key' is missing or not an object"),
    ([], "a JSON list, expected an object"),
    ({"format_version": 1, "key": {}, "info": {"layer_bits": [3, 3]}, "files": {"quantized": {}}},
     "field 'files.quantized' needs 'sha256' and 'shapes'"),
    ({"format_version": 1, "key": {}, "info": {}, "files": {}}, "field 'info.layer_bits' is missing"),
])
def test_hand_written_manifest_is_one_clear_error(cfg_file, tmp_path, capsys, manifest, message):
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["eval", str(cfg_file), "--k-chunk", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_run_streams_then_compares_exactly_ppl_tokens(tmp_path, capsys):
    from tests.runtime.tiny_hf import tiny_hf_cfg, tiny_hf_folder

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_hf_cfg(tiny_hf_folder(tmp_path / "m"), tmp_path / "art")))
    assert main(["run", str(cfg), "--prompt", "Hi", "--max-new-tokens", "5", "--ppl-tokens", "40"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("model "))):]
    assert [line.split()[1:3] for line in table[1:]] == [["reference", "32"], ["rtn", "3"], ["rtn", "3"]]
    assert all(line.split()[-1] == "40" for line in table[1:])  # tokens evaluated, as asked, rows once
    assert "5 tokens in" in captured.err and "tokens/s" in captured.err


def test_k_chunk_and_target_both_unset_is_one_config_error():
    from decdec.config import load_config

    with pytest.raises(ConfigError, match="'decdec.k_chunk' and 'decdec.target_slowdown' are both unset"):
        load_config({"decdec": {"k_chunk": None}})
