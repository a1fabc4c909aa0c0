"""The latency model on measured data: how well a measured-table model
predicts held-out points, and what the tuner would choose for Llama-3-8B-shaped layers.

    python bench/latency_model.py --gpu-ops bench/results/gpu_ops_1f98b3c_h200.json --out latency_model.json

Input: the overlap table of bench/gpu_ops.py (base GEMV + correction on a high-priority side
stream). Leave-one-out: each interior k_chunk point is predicted from its neighbours.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.meta import run_meta  # noqa: E402
from decdec.scheduler.latency import MeasuredModel  # noqa: E402
from decdec.scheduler.tuner import predicted_step_us, tune  # noqa: E402

LLAMA3_8B = {"qkv": (6144, 4096, 3, 32), "o": (4096, 4096, 3, 32), "gate_up": (28672, 4096, 3, 32), "down": (4096, 14336, 3, 32)}


def overlap_rows(gpu_ops: dict) -> list[dict]:
    return [{"out": r["out"], "in": r["in"], "bits": r["bits"], "k_chunk": r["k_chunk"], "n_tb": r["n_tb"],
             "base_us": r["base_us"], "pair_us": r["fused_us"]}
            for r in gpu_ops["overlap"] if r.get("side_priority", -1) == -1]


def leave_one_out(rows: list[dict]) -> list[float]:
    """Relative error of predicting each interior k_chunk from the others of its (shape, n_tb)."""
    errors = []
    for r in rows:
        rest = [x for x in rows if x is not r]
        m = MeasuredModel.from_rows("loo", rest)
        pred = m.pair_us(r["out"], r["in"], r["bits"], r["k_chunk"], r["n_tb"])
        if pred != float("inf"):
            errors.append(pred / r["pair_us"] - 1)
    return errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu-ops", default="bench/results/gpu_ops_1f98b3c_h200.json")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    gpu_ops = json.loads(Path(a.gpu_ops).read_text())
    rows = overlap_rows(gpu_ops)
    errors = leave_one_out(rows)
    within = sum(abs(e) <= 0.10 for e in errors) / len(errors)
    print(f"leave-one-out: {len(errors)} interior points, {within:.0%} within ±10 %, max |error| {max(map(abs, errors)):.1%}")
    model = MeasuredModel.from_rows(gpu_ops["env"]["device"], rows)
    # The step's non-GEMV work is not measured yet: take the step as its GEMVs alone (a conservative
    # budget: a real step is longer, so the same target allows more compensation).
    step = sum(model.base_us(o, i, b) * n for o, i, b, n in LLAMA3_8B.values())
    choices = {}
    for target in (0.025, 0.05, 0.10, 0.20):
        try:
            c = tune(model, LLAMA3_8B, step, target)
        except Exception as e:  # an unreachable target is a result too
            choices[target] = {"error": str(e)}
            print(f"target {target:.1%}: {e}")
            continue
        choices[target] = {name: {"k_chunk": x.k_chunk, "n_tb": x.n_tb, "slowdown": x.slowdown} for name, x in c.items()}
        choices[target]["predicted_step_slowdown"] = predicted_step_us(model, LLAMA3_8B, c, step) / step - 1
        print(f"target {target:.1%}: " + ", ".join(f"{n} k={x.k_chunk} tb={x.n_tb}" for n, x in c.items())
              + f"; predicted step {choices[target]['predicted_step_slowdown']:+.1%}")
    out = {**run_meta(), "source": a.gpu_ops, "gpu": gpu_ops["env"]["device"], "loo_points": len(errors),
           "loo_within_10pct": within, "loo_max_abs_error": max(map(abs, errors)),
           "step_us_assumed": step, "choices": {str(k): v for k, v in choices.items()}}
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
