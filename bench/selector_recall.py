"""Selection and residuals on activations recorded from a real model on evaluation text (never seen
in calibration): in-domain (pydoc's evaluation half) and off-domain (stdlib source, unlike the
calibration text). Per domain, k_chunk and group kind, averaged over layers:
  bucket_recall / static_recall  how many of the exact top-k channels the 32-bucket selector (and
                                 the static, mean-|x|-ranked baseline) picks
  above_top                      channels at or above the calibrated top edge (bucket 0, where ties
                                 go by index) per channel picked: > 1 when the text runs hotter
                                 than the calibration
  exact_in_coarse                share of the exact top-k below the calibrated edge of the k-th
                                 largest, where the 16 coarse buckets must tell them apart
  error_removed                  share of the group's quantization error on its outputs,
                                 ||x~ (W' - deq(Q))^T||^2, that the compensation removes

    python bench/selector_recall.py --config configs/gemma3-270m-3bit.yaml --out bench/results/selector_recall_gemma3-270m.json

The GPU selector picks bit-for-bit the same channels as this CPU reference (tests/ops), so the
recall holds for the kernel too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.meta import run_meta  # noqa: E402
from decdec.models.calibrate import collect_activations  # noqa: E402
from decdec.models.corpus import corpus_text, token_windows  # noqa: E402
from decdec.models.prepare import prepare  # noqa: E402
from bench.quality import DOMAINS  # noqa: E402
from decdec.models.residual import effective_weight  # noqa: E402
from decdec.ops import selector  # noqa: E402
from decdec.ops.correction import compensate  # noqa: E402
from decdec.config import load_config  # noqa: E402


def recall(picked: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over positions of |picked ∩ exact| / |exact|."""
    hits = (picked[:, :, None] == exact[:, None, :]).any(-1).sum(-1).float()
    return (hits / exact.shape[-1]).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/gemma3-270m-3bit.yaml")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--k-chunk", default="8,16,32,64")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cfg = load_config(a.config)
    prepared = prepare(cfg)
    model = prepared.model
    rows, positions, ks = [], {}, [int(v) for v in a.k_chunk.split(",")]
    for domain, corpus in DOMAINS.items():
        windows = token_windows(model.tokenizer, corpus_text(corpus, "eval"), min(a.tokens, 512), a.tokens)
        positions[domain] = sum(w.shape[0] for w in windows)
        acts = collect_activations(model.args, model.weights, windows)
        sums: dict[tuple[int, str], list[dict]] = {}
        for (layer, kind), x in acts.items():
            g = prepared.groups[layer, kind]
            xs = x * g.q.act_scale
            error = xs @ (effective_weight(model.weights[f"layers.{layer}.{kind}"], g.q) - g.q.dequantize()).T
            residual = g.residual.dequantize().T
            for k in ks:
                bounds = selector.bucket_bounds(g.thresholds, k)
                picked = selector.select_bucket(xs, k, bounds)
                exact = selector.select_exact(xs, k)
                left = error - compensate(xs, picked, residual)
                sums.setdefault((k, kind), []).append({
                    "bucket_recall": recall(picked, exact),
                    "static_recall": recall(selector.select_static(xs, k, g.mean_abs), exact),
                    "above_top": ((xs.abs() >= bounds.a).sum(-1).float() / picked.shape[-1]).mean().item(),
                    "exact_in_coarse": (xs.abs().gather(-1, exact) < bounds.b).float().mean().item(),
                    "error_removed": 1 - (left.square().sum() / error.square().sum()).item()})
        for (k, kind), values in sums.items():
            rows.append({"domain": domain, "k_chunk": k, "group": kind, "layers": len(values),
                         **{m: sum(v[m] for v in values) / len(values) for m in values[0]}})
            print(f"{domain:>3} k_chunk {k:>3} {kind:<8} " + "  ".join(f"{m} {rows[-1][m]:.3f}" for m in values[0]))
    out = {**run_meta(), "config": a.config, "model": model.source, "positions": positions, "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
