"""`decdec profile`: a per-op timeline of decode steps, a summary by op type, and a Chrome trace.

The profiled step's total is its span, from the first op's start to the last op's end.

On the CPU each op is timed with the host clock around its reference call, so the span is the sum of
the ops plus the timer's own cost (well under 1 %), and the shares of the summary, taken of the mean
span, add up to about 100 %. Each step total is
printed with its spread over the steps: on busy cores they vary widely from step to step, so
the profiled and the plain step, timed one after the other, can differ that much too (the CLI makes
torch's OpenMP threads sleep rather than spin while they wait, which removes most of that).

On the GPU (runtime/executor_cuda.py) the profiled steps are replays of the "profiled graph": the
captured step with CUDA timing events as nodes of the graph (one at the step's start, two around
each op; a compensated group's correction and GEMV are one op, as they run together). The timeline is the replayed step's own, and its span is the plain graph
replay plus the cost of two event nodes per op. The plain step (`engine.step`, no per-op timing: on
the GPU one replay of the captured graph) is timed too, and with `eager` also the step launched op
by op from Python with events around each op, a timeline made mostly of launch gaps.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path


def step_start(step: list[tuple]) -> float:
    """The first op's start of one step's (item, start, end)."""
    return min(start for _, start, _ in step)


def step_span(step: list[tuple]) -> float:
    """Seconds from the first op's start to the last op's end of one step's (item, start, end)."""
    return max(end for _, _, end in step) - step_start(step)


def _stats_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.2f} ms (median; {min(values) * 1e3:.2f} .. {max(values) * 1e3:.2f} over {len(values)} steps)"


def _timed_steps(engine, token: int, steps: int, **run_args) -> list[list[tuple]]:
    """Per step, the executor's (plan item, start s, end s) of every op, from position 0."""
    engine.reset()
    all_steps = []
    for _ in range(steps):
        timings: list = []
        engine.executor.run(token, engine.position, timings, **run_args)
        engine.position += 1
        all_steps.append(timings)
    return all_steps


def _plain_steps(engine, token: int, steps: int) -> list[float]:
    """Host wall seconds of each `engine.step` (on the GPU: a graph replay and the logits' copy)."""
    engine.reset()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step(token)
        times.append(time.perf_counter() - start)
    return times


def _timeline(step: list[tuple], index: int) -> list[str]:
    t0 = step_start(step)
    lines = [f"per-op timeline of step {index} (µs from step start)",
             f"{'layer':>5} {'op':<50} {'start':>9} {'end':>9} {'dur':>8}"]
    for item, start, end in step:
        layer = "" if item.layer is None else item.layer
        lines.append(f"{layer:>5} {item.name:<50} {(start - t0) * 1e6:>9.1f} {(end - t0) * 1e6:>9.1f} "
                     f"{(end - start) * 1e6:>8.1f}")
    return lines


def op_totals(all_steps: list[list[tuple]]) -> dict[str, tuple[int, float]]:
    """Op type -> (ops per step, mean summed seconds per step), the largest total first."""
    by_op: dict[str, list[float]] = {}
    for step in all_steps:
        for item, start, end in step:
            by_op.setdefault(item.op, []).append(end - start)
    n = len(all_steps)
    return {op: (len(times) // n, sum(times) / n) for op, times in sorted(by_op.items(), key=lambda kv: -sum(kv[1]))}


def _summary(all_steps: list[list[tuple]], span: float) -> list[str]:
    """Per op type: count, mean summed duration per step, and its share of the step's mean span."""
    lines = [f"summary by op type (mean per step over {len(all_steps)} steps; share of the profiled step's mean span: "
             "side-stream ops overlapping the main stream's, on the GPU, make shares add up to more than 100 %)",
             f"{'op':<40} {'count':>6} {'total µs':>10} {'share':>7}"]
    for op, (count, per_step) in op_totals(all_steps).items():
        lines.append(f"{op:<40} {count:>6} {per_step * 1e6:>10.1f} {per_step / (span or 1):>7.1%}")
    return lines


def profile_steps(engine, steps: int, trace_path: str | None = None, eager: bool = False) -> str:
    """Decode `steps` steps with per-op timing; returns the report, writes the trace if asked.

    `eager` (GPU only): also time the step launched op by op, the executor's path without a graph."""
    args = engine.prepared.model.args
    token = args.bos_id if args.bos_id is not None else 0
    captured = getattr(engine.executor, "graph", None) is not None  # a CUDA executor's captured step
    all_steps = _timed_steps(engine, token, steps)
    eager_steps = _timed_steps(engine, token, steps, eager=True) if eager and captured else None
    plain = _plain_steps(engine, token, steps)

    spans = [step_span(s) for s in all_steps]
    how = ("timing events inside the graph replay: the real step plus 2 event nodes per op" if captured
           else "ops run one after another, each timed on its own")
    lines = _timeline(all_steps[-1], steps) + [""] + _summary(all_steps, sum(spans) / len(spans)) + [""]
    lines.append(f"profiled step: {_stats_ms(spans)}, first op's start to last op's end; {how}")
    lines.append(f"plain step: {_stats_ms(plain)}, wall time of engine.step, no per-op timing"
                 + ("; one replay of the captured graph" if captured else ""))
    if eager_steps is not None:
        lines.append(f"eager step: {_stats_ms([step_span(s) for s in eager_steps])}, ops launched one by one from "
                     "Python with timing events, first op's start to last op's end: mostly launch gaps")
    elif eager:
        lines.append("eager step: not timed (only a captured GPU step has a separate launch-by-launch path)")
    if trace_path:
        write_chrome_trace(all_steps, trace_path)
        lines.append(f"wrote {trace_path} (open in Perfetto or chrome://tracing)")
    return "\n".join(lines)


def write_chrome_trace(steps: list[list[tuple]], path: str) -> None:
    """Chrome trace events: one complete ('X') event per op, on one track (the step's stream)."""
    t0 = step_start(steps[0])
    events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "stream"}}]
    for step_index, step in enumerate(steps):
        for item, start, end in step:
            events.append({"name": item.name, "cat": item.op, "ph": "X", "pid": 0, "tid": 0,
                           "ts": (start - t0) * 1e6, "dur": (end - start) * 1e6,
                           "args": {"step": step_index, "layer": item.layer, "k_chunk": item.attr("k_chunk")}})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ns"}))
