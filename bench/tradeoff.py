"""Quality at the speed the GPU measured: the perplexity the batch simulation gives at the k_chunk per
group that the tuner chose for each target slowdown, written into the engine results' rows (`ppl`).

    python bench/tradeoff.py --engine bench/results/engine_h100.json

For the real models whose shapes the engine run measured (Gemma 3 270M, SmolLM2-135M; the 3-bit
default quantizer, the quality bench's calibration and in-domain evaluation text), every `ours` row
gets the perplexity of its plan: the 3-bit model alone for the base step, the tuned k_chunk per
(kind, bits) otherwise. Perplexity does not depend on the KV length, so one evaluation serves the
rows of every length.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decdec.config import load_config  # noqa: E402
from decdec.models.prepare import prepare  # noqa: E402
from decdec.runtime.evaluate import decdec_linear, dense_groups, eval_windows, perplexity  # noqa: E402

MODELS = ("gemma3-270m", "smollm2-135m")


def plan_key(row: dict) -> tuple:
    """The plan a row ran: () for the base step, else its sorted (kind@bits, k_chunk) pairs."""
    return tuple(sorted((row.get("k_chunk") or {}).items())) if row.get("target") else ()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", required=True, help="bench/engine.py's JSON, updated in place")
    ap.add_argument("--tokens", type=int, default=2048, help="evaluation tokens")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    a = ap.parse_args()
    path = Path(a.engine)
    data = json.loads(path.read_text())
    for name in MODELS:
        rows = [r for r in data["rows"] if r["model"] == name and r["system"] == "ours" and "error" not in r]
        if not rows:
            continue
        cfg = load_config({"model": {"source": name}, "quant": {"bits": 3},
                           "calibration": {"tokens": a.calib_tokens, "ctx": a.ctx},
                           "eval": {"tokens": a.tokens, "ctx": a.ctx}})
        prepared = prepare(cfg)
        groups, windows = dense_groups(prepared), eval_windows(prepared)
        args, weights = prepared.model.args, prepared.model.weights
        ppl = {}
        for row in rows:
            key = plan_key(row)
            if key not in ppl:
                ks = {(k.split("@")[0], int(k.split("@")[1])): v for k, v in key}
                linear = decdec_linear(groups, "bucket", ks) if ks else decdec_linear(groups)
                ppl[key], _ = perplexity(args, weights, windows, linear, desc=f"{name} {dict(key) or 'base'}")
                print(f"{name} target {row['target']:.1%}: ppl {ppl[key]:.3f}", flush=True)
            row["ppl"] = ppl[key]
            row["ppl_method"] = f"{cfg.quant.method} 3-bit, {a.tokens} tokens of {cfg.eval.corpus} (eval half)"
        path.write_text(json.dumps(data, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
