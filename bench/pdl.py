"""Programmatic dependent launch, on and off: our base step's graph captured both ways, in one run.

    DECDEC_COMMIT=<sha> python bench/pdl.py [--models llama3-8b,gemma3-270m,smollm2-135m]
        [--positions 256,8192] [--steps 200] --out bench/results/pdl_<gpu>.json

Per model (bench/engine.py's synthetic 3-bit model of its shapes) one engine; its step graph is
captured with programmatic edges (`ops.ptx.programmatic_edges`, the default) and
without, and the two replays are timed alternately (ABAB, medians of CUDA-event times of one replay,
as bench/engine.py's device time; and wall time per token, token in and logits out). The logits of
both graphs must be bitwise equal (the same kernels run; only when they may start changes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.anchor import SHAPES  # noqa: E402
from bench.engine import MAX_SEQ, TOKEN, Run, close, log, our_engine, synthetic_prepared, timed  # noqa: E402
from bench.meta import run_meta  # noqa: E402
from decdec.scheduler.plan import MAIN  # noqa: E402


def measure(name: str, run: Run, rounds: int) -> list[dict]:
    engine = our_engine(synthetic_prepared(SHAPES[name], run.max_seq, "cuda"))
    ex = engine.executor
    graphs = {"pdl": (ex.graph, ex.pdl_edges), "plain": ex._capture(pdl=False)}
    rows = []
    try:
        for kv_len in run.positions:
            p = kv_len - 1
            logits, times = {}, {k: {"wall_ms": [], "device_ms": []} for k in graphs}
            for _ in range(rounds):
                for mode, (graph, _) in graphs.items():
                    ex.graph = graph
                    logits[mode] = ex.run(TOKEN, p)

                    def user_step():
                        engine.position = p
                        return engine.step(TOKEN)

                    t = timed(user_step, lambda: ex.replay_only(p), ex.streams[MAIN], run)
                    for key in t:
                        times[mode][key].append(t[key])
            same = torch.equal(logits["pdl"], logits["plain"])
            for mode, (_, edges) in graphs.items():
                wall, dev = statistics.median(times[mode]["wall_ms"]), statistics.median(times[mode]["device_ms"])
                rows.append({"model": name, "mode": mode, "position": p, "programmatic_edges": edges,
                             "wall_ms": wall, "device_ms": dev, "tokens_per_s": 1e3 / wall,
                             "device_tokens_per_s": 1e3 / dev, "logits_equal": same})
                log(f"{name:14s} KV {kv_len:5d} {mode:5s} edges {edges:4d}  wall {wall:.3f} ms  device {dev:.3f} ms"
                    f"  logits equal: {same}")
    finally:
        ex.graph = graphs["pdl"][0]
        close(engine)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama3-8b,gemma3-270m,smollm2-135m")
    ap.add_argument("--positions", default="256,8192")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    run = Run("cuda", MAX_SEQ, tuple(int(p) for p in a.positions.split(",")), a.steps, 20, False, None)
    result = {**run_meta(), "rows": []}
    for name in a.models.split(","):
        result["rows"] += measure(name, run, a.rounds)
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
