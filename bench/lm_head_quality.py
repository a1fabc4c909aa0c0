"""Perplexity with the lm_head quantized: what a smaller lm_head costs in quality (it is a large share of the
bytes a decode step reads: the file's `bytes`; `quant.lm_head_bits: 8` is the int8 row below).

    python bench/lm_head_quality.py --model gemma3-270m [--tokens 4094] [--ctx 512] --out FILE.json

On the CPU (`runtime.evaluate`), the packaged model at the default config (robust 3-bit layers), without
DecDEC and with it at --k-chunk (bucket selection), and the reference weights; each with the lm_head as
it is and quantized, as dequantized float32 weights:
  int8    symmetric, one scale per output row (`ops.lm_head`, what `quant.lm_head_bits: 8` runs: 1 byte a weight)
  4-bit   asymmetric, groups of 128 inputs, round to nearest (`models.quantize.quant_dequant`, the base
          GEMV's format: 0.5 byte a weight + 4 bytes of scale and zero per group)
Texts as bench/quality.py's: in-domain (the calibration corpus' evaluation half) and off-domain
(CPython source). Nothing in the product imports this file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.meta import run_meta  # noqa: E402
from bench.quality import BITS, domain_windows  # noqa: E402
from decdec.config import load_config  # noqa: E402
from decdec.models.loader import load_model  # noqa: E402
from decdec.models.prepare import prepare  # noqa: E402
from decdec.models.quantize import quant_dequant  # noqa: E402
from decdec.ops.lm_head import dequantize_rows, quantize_rows_int8  # noqa: E402
from decdec.runtime.evaluate import decdec_linear, dense_groups, perplexity  # noqa: E402


LM_HEADS = {"fp": lambda w: w, "int8": lambda w: dequantize_rows(*quantize_rows_int8(w)),
            "4-bit": lambda w: quant_dequant(w, 4)}
BYTES_PER_WEIGHT = {"fp": 2.0, "int8": 1.0, "4-bit": 0.5 + 4 / 128}  # as the GPU step would read it


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", type=int, default=4094)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--k-chunk", type=int, default=32)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model = load_model(a.model)
    windows, domains = domain_windows(model, a.ctx, a.tokens)
    result = {**run_meta(), "model": a.model, "bits": BITS, "ctx": a.ctx, "k_chunk": a.k_chunk, "domains": domains,
              "rows": []}
    prepared = prepare(load_config({"model": {"source": a.model}, "quant": {"bits": BITS}}), progress=False, model=model)
    groups = dense_groups(prepared)
    lm_head = model.weights["lm_head"].float()
    layer_params = sum(g.weight.numel() for g in groups.values())
    # bytes a decode step reads: the 3-bit layers (+ 4 B of scale and zero per group of 128) and the lm_head
    layer_bytes = layer_params * (BITS / 8 + 4 / 128)
    result["bytes"] = {head: {"lm_head": lm_head.numel() * b, "layers": layer_bytes,
                              "lm_head_share": lm_head.numel() * b / (lm_head.numel() * b + layer_bytes)}
                       for head, b in BYTES_PER_WEIGHT.items()}
    print({head: f"lm_head {v['lm_head_share']:.0%} of the step's weight bytes" for head, v in result["bytes"].items()})
    systems = [("reference", None), (f"{BITS}-bit", decdec_linear(groups, "none", 0)),
               (f"{BITS}-bit + DecDEC k={a.k_chunk}", decdec_linear(groups, "bucket", a.k_chunk))]
    for head, fn in LM_HEADS.items():
        weights = {**model.weights, "lm_head": fn(lm_head).to(model.weights["lm_head"].dtype)}
        for system, linear in systems:
            for domain, ws in windows.items():
                ppl, tokens = perplexity(model.args, weights, ws, linear, progress=False)
                result["rows"].append({"lm_head": head, "system": system, "domain": domain, "ppl": ppl,
                                       "tokens": tokens})
                print(f"lm_head {head:>5}  {system:<22} {domain:>3}  ppl {ppl:.3f}", flush=True)
                Path(a.out).write_text(json.dumps(result, indent=1))  # partial results survive
    result["complete"] = True
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
