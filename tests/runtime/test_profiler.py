"""The profiler's report from scripted per-op timings: the step's span (not the sum of overlapping
ops), the shares of the span, the three totals of a captured (GPU) step, and the trace."""

import json
import types

import pytest
import torch

from decdec.graph import Node
from decdec.runtime.profiler import profile_steps, step_span
from decdec.scheduler.plan import Launch


def item(op: str, layer=None, group=None) -> Launch:
    attrs = (("group", group),) if group else ()
    return Launch((Node(op, (), (), layer, attrs),))


# µs from the step's start; two ops overlap (the span is not the sum of the ops)
OPS = [(item("embed"), 0, 10), (item("base_gemv", layer=0, group="qkv"), 10, 40),
       (item("correction", layer=0, group="qkv"), 15, 35), (item("lm_head"), 40, 50)]
EAGER_SCALE = 10  # the eager path's ops take 10x longer (launch gaps)


class ScriptedExecutor:
    """Every step's ops at OPS' offsets from a host clock that starts each step 1 ms later; `graph`
    set: a captured step (GPU), with its eager path. Records its calls."""

    def __init__(self):
        self.graph, self.calls = object(), []

    def run(self, token, position, timings=None, *, eager=False):
        self.calls.append((position, timings is not None, eager))
        if timings is not None:
            t0, scale = position * 1e-3, EAGER_SCALE if eager else 1
            timings += [(it, t0 + s * scale * 1e-6, t0 + e * scale * 1e-6) for it, s, e in OPS]
        return torch.zeros(4)


class ScriptedCPUExecutor(ScriptedExecutor):
    """No graph and no eager path, as runtime/executor_cpu.py."""

    def __init__(self):
        super().__init__()
        self.graph = None

    def run(self, token, position, timings=None):
        return super().run(token, position, timings)


class ScriptedEngine:
    def __init__(self, executor):
        self.executor, self.position = executor, 0
        self.prepared = types.SimpleNamespace(model=types.SimpleNamespace(args=types.SimpleNamespace(bos_id=1)))

    def reset(self):
        self.position = 0

    def step(self, token):
        logits = self.executor.run(token, self.position)
        self.position += 1
        return logits


def test_step_span_is_first_start_to_last_end():
    step = [(it, 1.0 + s * 1e-6, 1.0 + e * 1e-6) for it, s, e in OPS]
    assert step_span(step) == pytest.approx(50e-6)  # not 70 µs, the sum of the ops


def test_report_of_a_captured_step(tmp_path):
    engine = ScriptedEngine(ScriptedExecutor())
    report = profile_steps(engine, 3, str(tmp_path / "trace.json"), eager=True)
    calls = engine.executor.calls
    assert calls == [(p, True, False) for p in range(3)] + [(p, True, True) for p in range(3)] + \
        [(p, False, False) for p in range(3)]
    lines = report.splitlines()
    assert "profiled step: 0.05 ms (median; 0.05 .. 0.05 over 3 steps)" in report and "inside the graph replay" in report
    assert "eager step: 0.50 ms" in report and "plain step:" in report and "replay of the captured graph" in report
    rows = {line.split()[0]: line.split() for line in lines[lines.index("") + 3:] if line and "%" in line}
    assert rows["base_gemv"][1:] == ["1", "30.0", "60.0%"] and rows["correction"][1:] == ["1", "20.0", "40.0%"]
    assert sum(float(r[-1][:-1]) for r in rows.values()) == pytest.approx(140.0)  # overlap: above 100 %
    timeline = next(line for line in lines if "L0.qkv.correction" in line).split()
    assert timeline[2:] == ["15.0", "35.0", "20.0"]
    events = [e for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"] if e["ph"] == "X"]
    assert len(events) == 3 * len(OPS) and {e["tid"] for e in events} == {0}
    assert events[0]["ts"] == 0 and events[2]["ts"] == pytest.approx(15.0)


def test_report_of_a_cpu_step():
    engine = ScriptedEngine(ScriptedCPUExecutor())
    report = profile_steps(engine, 2, eager=True)
    assert engine.executor.calls == [(0, True, False), (1, True, False), (0, False, False), (1, False, False)]
    assert "profiled step: 0.05 ms" in report and "one after another" in report
    assert "eager step: not timed" in report
    rows = [line.split() for line in report.splitlines() if line.endswith("%")]
    assert sum(float(r[-1][:-1]) for r in rows) == pytest.approx(140.0)  # the scripted ops overlap: 70 of 50 µs
    assert "eager step" not in profile_steps(engine, 2)
