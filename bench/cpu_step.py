"""Decode speed of the CPU engine (issue 3): engine.step() tokens/s with and without DecDEC.

    python bench/cpu_step.py --config configs/gemma3-270m-3bit.yaml --out bench/results/cpu_step_gemma3-270m.json

A CPU figure (the reference executor, float32): it shows the cost of the compensation path on
the host, not the GPU's. Both engines share the same prepared artifacts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decdec import runtime  # noqa: E402
from bench.meta import run_meta  # noqa: E402
from decdec.config import load_config  # noqa: E402


def tokens_per_second(engine, steps: int, warmup: int = 2) -> dict:
    token = engine.prepared.model.args.bos_id or 0
    engine.reset()
    for _ in range(warmup):
        engine.step(token)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step(token)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"steps": steps, "median_step_ms": median * 1e3, "tokens_per_s": 1 / median}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/gemma3-270m-3bit.yaml")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cfg = load_config(a.config)
    rows = []
    for selection in ("none", "bucket"):
        c = dataclasses.replace(cfg, decdec=dataclasses.replace(cfg.decdec, selection=selection))
        engine = runtime.compile(c)
        rows.append({"selection": selection, "k_chunk": engine.k_chunk, **tokens_per_second(engine, a.steps)})
        print(f"{selection:<7} k_chunk {engine.k_chunk:>3}: {rows[-1]['tokens_per_s']:.2f} tokens/s "
              f"({rows[-1]['median_step_ms']:.1f} ms/step)")
    result = {**run_meta(), "config": a.config, "model": cfg.model.source if isinstance(cfg.model.source, str) else "synthetic",
              "quant": dataclasses.asdict(cfg.quant), "rows": rows,
              "decdec_slowdown": rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"] - 1}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"DecDEC slowdown on the CPU: {result['decdec_slowdown']:+.1%}; wrote {a.out}")


if __name__ == "__main__":
    main()
