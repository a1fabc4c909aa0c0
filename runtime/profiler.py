"""`decdec profile`: a per-op timeline of decode steps, a summary by op type, and a Chrome trace.

On the CPU each op is timed with the host clock around its reference call; ops of both plan
streams run one after another there, so the profiled step is the sum of its ops plus the timer's
own cost. On the GPU (runtime/executor_cuda.py) the profiled steps are launched op by op instead of
replayed, with CUDA events around each op on its own stream: side-stream ops overlap the main
stream's, and the launch gaps of Python are in the timeline. The plain step (no per-op timing; on
the GPU the graph replay) is timed too, and both totals are printed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def _timed_step(engine, token: int) -> list[tuple]:
    timings: list = []
    engine.executor.run(token, engine.position, timings)
    engine.position += 1
    return timings


def profile_steps(engine, steps: int, trace_path: str | None = None) -> str:
    """Decode `steps` steps with per-op timing; returns the report, writes the trace if asked."""
    args = engine.prepared.model.args
    token = args.bos_id if args.bos_id is not None else 0
    engine.reset()
    all_steps = [_timed_step(engine, token) for _ in range(steps)]
    engine.reset()
    plain = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step(token)
        plain.append(time.perf_counter() - start)

    last, t0 = all_steps[-1], all_steps[-1][0][1]
    lines = [f"per-op timeline of step {steps} (µs from step start)",
             f"{'layer':>5} {'op':<26} {'stream':<6} {'start':>9} {'end':>9} {'dur':>8}"]
    for item, start, end in last:
        layer = "" if item.node.layer is None else item.node.layer
        lines.append(f"{layer:>5} {item.node.name:<26} {'side' if item.stream else 'main':<6} "
                     f"{(start - t0) * 1e6:>9.1f} {(end - t0) * 1e6:>9.1f} {(end - start) * 1e6:>8.1f}")
    by_op: dict[str, list[float]] = {}
    for step in all_steps:
        for item, start, end in step:
            by_op.setdefault(item.node.op, []).append(end - start)
    profiled = sum(end - start for _, start, end in last)
    lines += ["", f"summary by op type (mean per step over {steps} steps)",
              f"{'op':<14} {'count':>6} {'total µs':>10} {'share':>7}"]
    for op, times in sorted(by_op.items(), key=lambda kv: -sum(kv[1])):
        per_step = sum(times) / steps
        lines.append(f"{op:<14} {len(times) // steps:>6} {per_step * 1e6:>10.1f} {per_step / (profiled or 1):>7.1%}")
    plain_ms = sorted(plain)[len(plain) // 2] * 1e3
    lines += ["", f"profiled step (sum of timed ops, last step): {profiled * 1e3:.2f} ms; "
                  f"plain step (median, no per-op timing): {plain_ms:.2f} ms"]
    if trace_path:
        write_chrome_trace(all_steps, trace_path)
        lines.append(f"wrote {trace_path} (open in Perfetto or chrome://tracing)")
    return "\n".join(lines)


def write_chrome_trace(steps: list[list[tuple]], path: str) -> None:
    """Chrome trace events: one track per stream, one complete ('X') event per op."""
    t0 = steps[0][0][1]
    events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": s, "args": {"name": name}}
              for s, name in ((0, "main stream"), (1, "side stream"))]
    for step_index, step in enumerate(steps):
        for item, start, end in step:
            node = item.node
            events.append({
                "name": node.name, "cat": node.op, "ph": "X", "pid": 0, "tid": item.stream,
                "ts": (start - t0) * 1e6, "dur": (end - start) * 1e6,
                "args": {"step": step_index, "layer": node.layer, "k_chunk": node.attr("k_chunk")},
            })
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ns"}))
