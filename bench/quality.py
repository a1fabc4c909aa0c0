"""Perplexity table of issue 2: reference, RTN/AWQ at 4 and 3 bits, the 3.5-bit point, and 3-bit
AWQ + DecDEC with bucket / exact / static selection over k_chunk, for one packaged model.

    python bench/quality.py --model gemma3-270m --tokens 4096 --ctx 512 --out bench/results/quality_gemma3-270m.json
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
from decdec.runtime.evaluate import eval_rows, format_table  # noqa: E402

QUANT_POINTS = [("rtn", 4), ("awq", 4), ("rtn", 3.5), ("awq", 3.5), ("rtn", 3), ("awq", 3)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--k-chunk", default="8,16,32,64")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    k_chunks = [int(k) for k in a.k_chunk.split(",")]
    model = load_model(a.model)
    rows, started, meta = [], time.time(), run_meta()  # provenance of the code that ran, taken at the start
    for method, bits in QUANT_POINTS:
        cfg = load_config({
            "model": {"source": a.model},
            "quant": {"method": method, "bits": bits},
            "calibration": {"tokens": a.calib_tokens, "ctx": a.ctx},
            "eval": {"tokens": a.tokens, "ctx": a.ctx},
        })
        prepared = prepare(cfg, model=model)
        # 3-bit AWQ is the paper's compensated point (all three selections); 3-bit RTN, where
        # quantization hurts most, gets the real (bucket) selection too.
        selections = {("awq", 3): ["bucket", "exact", "static"], ("rtn", 3): ["bucket"]}.get((method, bits), [])
        rows += eval_rows(prepared, k_chunks if selections else [], selections, reference=not rows)
        write(a, meta, rows, started, complete=(method, bits) == QUANT_POINTS[-1])  # partial results survive
    print(format_table(rows))
    print(f"wrote {a.out}")


def write(a, meta: dict, rows: list[dict], started: float, complete: bool) -> None:
    result = {**meta, "model": a.model, "ctx": a.ctx, "eval_tokens": rows[0]["tokens"],
              "calibration_tokens": a.calib_tokens, "seconds": round(time.time() - started),
              "complete": complete, "rows": rows}
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
