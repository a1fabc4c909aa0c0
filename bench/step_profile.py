"""Where our GPU decode step goes, for the base step of bench/engine.py's synthetic models (random
3-bit weights of the real shapes): `decdec profile`'s summary by op type, the glue share, and each
kernel's own duration from CUPTI (torch.profiler over graph replays, no timing events between).

    python bench/step_profile.py [--models llama3-8b,gemma3-270m] [--steps 16] [--k-chunk K] [--out FILE.json]

With --k-chunk, the step compensates every linear group at that k_chunk (the fused corrections show
among the kernels, beside the GEMVs they overlap).

Glue = everything but the base GEMVs' launches and the lm_head, as a share of the profiled step's span
(the graph replay plus two timing-event nodes per op; the plain replay is printed beside it). The glue
the plan folds into a GEMV's launch (scheduler.plan.FOLDS) counts as that GEMV's time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.anchor import SHAPES  # noqa: E402
from bench.engine import close, engine_config, our_engine, synthetic_prepared  # noqa: E402
from bench.meta import run_meta  # noqa: E402
from decdec.runtime.profiler import _timed_steps, op_totals, step_span  # noqa: E402

NOT_GLUE = ("base_gemv", "lm_head")


def kernel_times(replay, n: int) -> dict[str, list]:
    """Kernel name -> [launches per replay, µs per replay] over `n` graph replays, from CUPTI's records
    (torch.profiler): the kernels' own durations, no timing events between them."""
    from torch.profiler import ProfilerActivity, profile

    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            replay()
        torch.cuda.synchronize()
    out: dict[str, list] = {}
    for e in prof.key_averages():
        if e.device_time_total > 0:
            name = re.sub(r"^_Z\d+|cudapy|\$\d+|_3c_|\d+numba.*", "", e.key)[:60]
            c, t = out.get(name, [0, 0.0])
            out[name] = [c + e.count / n, t + e.device_time_total / n]
    return dict(sorted(out.items(), key=lambda kv: -kv[1][1]))


def profile_model(name: str, steps: int, max_seq: int, k_chunk: int = 0) -> dict:
    prepared = synthetic_prepared(SHAPES[name], max_seq, "cuda")
    if k_chunk:
        cfg = engine_config(prepared.config.model.source["synthetic"], "cuda", {"k_chunk": k_chunk})
        prepared = dataclasses.replace(prepared, config=cfg)
    engine = our_engine(prepared)
    try:
        token = 1
        all_steps = _timed_steps(engine, token, steps)
        span = statistics.median([step_span(s) for s in all_steps])
        by_op = {op: seconds for op, (_, seconds) in op_totals(all_steps).items()}
        ops = engine.executor
        plain = []
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        for _ in range(steps):
            ev[0].record(ops.streams[0])
            ops.replay_only(steps)
            ev[1].record(ops.streams[0])
            ev[1].synchronize()
            plain.append(ev[0].elapsed_time(ev[1]) / 1e3)
        kernels = kernel_times(lambda: ops.replay_only(steps), steps)
        glue = sum(v for k, v in by_op.items() if not any(n in k for n in NOT_GLUE))
        return {"model": name, "k_chunk": k_chunk, "span_us": span * 1e6, "replay_us": statistics.median(plain) * 1e6,
                "ops_us": {k: v * 1e6 for k, v in by_op.items()},
                "glue_share": glue / span, "kernels_us": kernels}
    finally:
        close(engine)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llama3-8b,gemma3-270m")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--max-seq", type=int, default=8192)
    ap.add_argument("--k-chunk", type=int, default=0, help="compensate every group at this k_chunk")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows = []
    for name in a.models.split(","):
        r = profile_model(name, a.steps, a.max_seq, a.k_chunk)
        rows.append(r)
        print(f"{name} (k_chunk {a.k_chunk}): profiled step {r['span_us']:.0f} µs, plain replay {r['replay_us']:.0f} µs, "
              f"glue {r['glue_share']:.1%}")
        for op, us in r["ops_us"].items():
            print(f"  {op:<28} {us:8.1f} µs {us / r['span_us']:6.1%}")
        total = sum(t for _, t in r["kernels_us"].values())
        print(f"  kernels (CUPTI, per replay): {total:.0f} µs in all")
        for k, (c, t) in list(r["kernels_us"].items())[:20]:
            print(f"    {k:<60} x{c:5.1f} {t:8.1f} µs {t / c:6.2f} each")
    if a.out:
        Path(a.out).write_text(json.dumps({**run_meta(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
