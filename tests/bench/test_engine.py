"""bench/engine.py end to end on the CPU (tiny model, anchor uncompiled), its row schema, --merge, and
bench/report.py's end-to-end tables on what it writes and on a fake GPU file (ratios, tuned rows)."""

import json

import pytest

from bench import engine, report

ROW_KEYS = {"model", "system", "target", "position", "kv_len", "tokens_per_s", "device_tokens_per_s", "wall_ms",
            "device_ms", "weight_bytes", "frac_roofline", "device_frac_roofline", "ppl", "run"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results" / "engine_cpu.json"
    engine.main(["--device", "cpu", "--tiny", "--eager", "--steps", "1", "--positions", "4,8", "--out", str(out)])
    return out


def test_dry_run_rows(dry_run):
    d = json.loads(dry_run.read_text())
    assert {"device", "commit", "command", "date", "runs", "rows", "max_seq"} <= set(d)
    measured = [r for r in d["rows"] if "error" not in r]
    systems = ("ours", "ours-lm8", "ours-3.5bit", "ours-4bit", "anchor-bf16")
    assert {(r["system"], r["position"]) for r in measured} == {(s, p) for s in systems for p in (3, 7)}
    for r in measured:
        assert ROW_KEYS <= set(r) and r["model"] == "tiny" and r["target"] == 0 and r["kv_len"] == r["position"] + 1
        assert r["tokens_per_s"] > 0 and r["device_tokens_per_s"] > 0 and r["frac_roofline"] is None  # no HBM rate
    (int4,) = [r for r in d["rows"] if r["system"] == "anchor-int4"]
    assert "CUDA only" in int4["error"]


def test_report_renders_dry_run(dry_run, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", dry_run.parent)
    table = report.engine_table(dry_run)
    assert "| tiny | 4 | ours | base |" in table and "| tiny |  | anchor-int4 |  | fails (below) |" in table
    assert "- tiny, anchor-int4: RuntimeError: skipped" in table
    assert "| tiny | 4 | ours 3-bit |" not in table  # the summary's layout is its own
    summary = report.engine_summary(dry_run)
    assert "| tiny | 4 |" in summary and "| fails |" in summary


def test_merge_keeps_other_systems(dry_run, tmp_path):
    out = tmp_path / "engine_cpu.json"
    out.write_text(dry_run.read_text())
    d = engine.main(["--device", "cpu", "--tiny", "--eager", "--steps", "1", "--positions", "8", "--systems", "ours",
                     "--out", str(out), "--merge"])
    assert [x["id"] for x in d["runs"]] == [0, 1]
    ours = [r for r in d["rows"] if r["system"] == "ours"]
    assert [(r["position"], r["run"]) for r in ours] == [(7, 1)]  # this run's rows replace the pair's old ones
    assert {r["run"] for r in d["rows"] if r["system"] != "ours"} == {0}


def fake_gpu_file(tmp_path):
    run = engine.Run("cuda", 8192, (256,), 64, 5, False, 3000.0)
    t = lambda wall, dev: {"wall_ms": wall, "device_ms": dev}  # noqa: E731
    rows = [engine.make_row("llama3-8b", "ours", 0.0, 255, t(2.0, 1.5), 3_000_000_000, run),
            engine.make_row("llama3-8b", "ours-lm8", 0.0, 255, t(1.6, 1.2), 2_500_000_000, run),
            engine.make_row("llama3-8b", "ours", 0.05, 255, t(2.1, 1.575), 3_000_000_000, run, slowdown=0.05,
                            predicted_slowdown=0.04, tuner_slowdown=0.045, k_chunk={"qkv@3": 0, "o@3": 0,
                            "gate_up@3": 12, "down@3": 4}, n_tb={"qkv@3": 0, "o@3": 0, "gate_up@3": 16, "down@3": 8}),
            engine.make_row("llama3-8b", "anchor-int4", 0.0, 255, t(4.0, 3.0), 5_000_000_000, run, cudagraph_skips=0),
            engine.make_row("llama3-8b", "anchor-bf16", 0.0, 255, t(6.0, 5.5), 16_000_000_000, run, cudagraph_skips=0),
            engine.error_row("smollm2-135m", "anchor-int4", 0.0, RuntimeError("Expected isEvenDivisor(...)")),
            engine.error_row("llama3-8b", "ours", 0.025, ValueError("target slowdown 2.5% cannot be met"))]
    meta = {"device": "NVIDIA H100 80GB HBM3", "commit": "abcdef0123", "date": "2026-12-06T07:00:00+00:00",
            "command": "bench/engine.py --models llama3-8b", "torch": "2.11.0+cu130"}
    d = {**meta, "max_seq": 8192, "bits": 3, "runs": [{"id": 0, **meta, "hbm_read_GBps": 3000.0, "max_seq": 8192,
                                                       "steps": 64}],
         "rows": [{**r, "run": 0} for r in rows]}
    path = tmp_path / "engine_h100.json"
    path.write_text(json.dumps(d))
    return path


def test_report_ratios_and_tuned_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    path = fake_gpu_file(tmp_path)
    table = report.engine_table(path)
    # ours 500 tok/s wall (2 ms) vs the anchor's 250: 2.00x; device 666.7 vs 333.3: 2.00x; roofline 3 GB / 3 TB/s / 2 ms
    assert "| llama3-8b | 256 | ours | base | 500.0 | 666.7 | 50% | 2.00x | 2.00x |  |  |  |" in table
    assert "| +5.0% (+4.0%) | - / - / 12 (16) / 4 (8) |" in table
    assert "| llama3-8b |  | ours | 2.5% | unreachable (below) |" in table
    assert "| smollm2-135m |  | anchor-int4 |  | fails (below) |" in table
    assert "- smollm2-135m, anchor-int4: RuntimeError: Expected isEvenDivisor" in table
    summary = report.engine_summary(path)
    assert "| llama3-8b | 256 | ours-lm8 | base | 625.0 | 833.3 | 52% | 2.50x | 2.50x |" in table
    assert ("| llama3-8b | 256 | 500.0 (666.7) | 625.0 (833.3) | 250.0 (333.3) | 166.7 (181.8) | 2.00x (2.50x) "
            "| 2.00x (2.50x) |") in summary


def test_results_page_has_the_engine_section(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    fake_gpu_file(tmp_path)
    out = tmp_path / "RESULTS.md"
    report.main(["--out", str(out)])
    text = out.read_text()
    assert text.startswith("# Results") and "## End to end: our engine beside the anchor" in text
    assert "## Kernels" not in text  # sections without files are left out


def test_compensated_rows_on_cpu_stand_in(monkeypatch):
    """The --targets and --k-chunks branches (GPU: compile_cuda with a target or a k_chunk) with a
    stand-in compile: the CPU engine carrying a tuner's Tuning, one target the tuner refuses, and a
    fixed k_chunk."""
    from decdec.errors import ConfigError
    from decdec.scheduler.tuner import Choice, Round, Tuning

    run = engine.Run("cpu", engine.TINY_MAX_SEQ, (4, 8), 1, 1, True, None)
    prepared = engine.synthetic_prepared(engine.TINY, run.max_seq, "cpu")
    base = engine.our_engine(prepared)
    shapes = {("gate_up", 3): (1024, 256, 3, 2)}
    targets_seen, build = [], engine.our_engine

    def stand_in(p, profile, path):
        target = p.config.decdec.target_slowdown
        targets_seen.append((target, p.config.decdec.k_chunk, profile, path))
        if target is not None and target < 0.05:
            raise ConfigError(f"target slowdown {target:.1%} cannot be met")
        e = build(prepared)
        if target is None:
            return e
        e.tuning = Tuning(target, 1000.0, 1040.0, {("gate_up", 3): Choice(12, 16, 10.0, 30.0)}, shapes,
                          rounds=(Round(target, 1040.0, 1045.0, (), ((("gate_up", 3), 12),)),))
        return e

    monkeypatch.setattr(engine, "our_engine", stand_in)
    rows = []
    for target in (0.025, 0.1):
        engine.compensated("tiny", prepared, base, 123, run, rows.append, target, {"target_slowdown": target},
                           "PROFILE", "PATH")
    engine.compensated("tiny", prepared, base, 123, run, rows.append, 0.0, {"k_chunk": 4})
    assert [(t, k, pr, pa) for t, k, pr, pa in targets_seen] == [(0.025, None, "PROFILE", "PATH"),
                                                                (0.1, None, "PROFILE", "PATH"), (None, 4, None, None)]
    fixed = rows[3:]
    assert [r["position"] for r in fixed] == [3, 7] and all(r["target"] == 0.0 for r in fixed)
    assert all(set(r["k_chunk"].values()) == {4} and "predicted_slowdown" not in r for r in fixed)
    rows = rows[:3]
    assert rows[0]["target"] == 0.025 and "cannot be met" in rows[0]["error"]
    for r, p in zip(rows[1:], (3, 7)):
        assert r["target"] == 0.1 and r["position"] == p and r["k_chunk"] == {"gate_up@3": 12}
        assert r["n_tb"] == {"gate_up@3": 16} and r["predicted_slowdown"] == pytest.approx(0.04)
        assert r["tuner_slowdown"] == pytest.approx(0.045)
        assert r["slowdown"] == pytest.approx(r["device_ms"] / r["base_device_ms"] - 1) and r["tuner_rounds"] == 1
        assert r["tuner_search"][0][:3] == pytest.approx([0.1, 0.04, 0.045])
        assert r["tuner_search"][0][3] == {"gate_up@3": 12}
