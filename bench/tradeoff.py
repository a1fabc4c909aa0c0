"""Quality against measured slowdown: the perplexity the batch simulation gives at the k_chunk per group
that the tuner chose on the GPU for each target slowdown (bench/gpu_engine.py's JSON).

    python bench/tradeoff.py --engine bench/results/gpu_engine_{gemma,smollm}_h100.json \
        --out bench/results/tradeoff_h100.json

For Gemma 3 270M and SmolLM2-135M (3-bit AWQ, the quality bench's calibration and evaluation text),
each tuned target of the GPU run becomes one row: target, measured slowdown and tokens/s on the GPU,
the chosen k_chunk and n_tb per group kind, and the CPU-simulated perplexity with those k_chunk
(bucket selection), next to the 3-bit model alone and the 3.5- and 4-bit models from the quality bench.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.meta import run_meta  # noqa: E402
from decdec.models.loader import load_model  # noqa: E402
from decdec.models.prepare import prepare  # noqa: E402
from decdec.config import load_config  # noqa: E402
from decdec.runtime.evaluate import decdec_linear, dense_groups, eval_windows, perplexity  # noqa: E402

MODELS = ("gemma3-270m", "smollm2-135m")


def tuned_k(row: dict) -> dict[tuple[str, int], int]:
    """{(kind, bits): k_chunk} from a gpu_engine row's choices ('kind@bits' keys)."""
    return {(key.split("@")[0], int(key.split("@")[1])): c["k_chunk"] for key, c in row["choices"].items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", required=True, nargs="+", help="bench/gpu_engine.py's JSON files")
    ap.add_argument("--tokens", type=int, default=2048, help="evaluation tokens")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    runs = [json.loads(Path(path).read_text()) for path in a.engine]
    models = {name: m for run in runs for name, m in run["models"].items()}
    result = {**run_meta(), "engine_json": a.engine, "engine_commit": sorted({r.get("commit") for r in runs}),
              "engine_device": sorted({r.get("device") for r in runs}), "rows": []}
    started = time.time()
    for name in MODELS:
        gpu = models.get(name)
        if gpu is None:
            print(f"{name}: not in {a.engine}, skipped")
            continue
        cfg = load_config({"model": {"source": name}, "quant": {"method": "awq", "bits": 3},
                           "calibration": {"tokens": a.calib_tokens, "ctx": a.ctx},
                           "eval": {"tokens": a.tokens, "ctx": a.ctx}})
        prepared = prepare(cfg, model=load_model(name))
        groups, windows = dense_groups(prepared), eval_windows(prepared)
        args, weights = prepared.model.args, prepared.model.weights
        base_ppl, tokens = perplexity(args, weights, windows, decdec_linear(groups), desc=f"{name} 3-bit")
        base = next(r for r in gpu["rows"] if r.get("target") == 0.0)
        result["rows"].append({"model": name, "target": 0.0, "slowdown": 0.0, "tokens_per_s": base["tokens_per_s"],
                               "k_chunk": {}, "ppl": base_ppl, "tokens": tokens})
        print(f"{name}: 3-bit alone ppl {base_ppl:.3f}")
        for row in gpu["rows"]:
            if not isinstance(row.get("target"), float) or row["target"] == 0.0:
                continue
            if "error" in row:
                result["rows"].append({"model": name, "target": row["target"], "error": row["error"]})
                continue
            ks = tuned_k(row)
            linear = decdec_linear(groups, "bucket", ks)
            ppl, _ = perplexity(args, weights, windows, linear, desc=f"{name} target {row['target']:.1%}")
            result["rows"].append({"model": name, "target": row["target"], "slowdown": row["slowdown"],
                                   "tokens_per_s": row["tokens_per_s"], "choices": row["choices"], "ppl": ppl,
                                   "tokens": tokens})
            print(f"{name}: target {row['target']:.1%} measured {row['slowdown']:+.1%} "
                  f"k {({f'{k}@{b}': v for (k, b), v in ks.items()})} ppl {ppl:.3f}", flush=True)
        result["seconds"] = round(time.time() - started)
        Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
