"""Selector recall (issue 4, table 4): how many of the exact top-k channels the 32-bucket selector
picks, on activations recorded from a real model on evaluation text (never seen in calibration):
in-domain (pydoc's evaluation half) and off-domain (stdlib source, unlike the calibration text).

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
from decdec.ops import selector  # noqa: E402
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
    rows, positions = [], {}
    for domain, corpus in DOMAINS.items():
        windows = token_windows(model.tokenizer, corpus_text(corpus, "eval"), min(a.tokens, 512), a.tokens)
        positions[domain] = sum(w.shape[0] for w in windows)
        acts = collect_activations(model.args, model.weights, windows)
        for k in (int(v) for v in a.k_chunk.split(",")):
            by_kind: dict[str, list[tuple[float, float]]] = {}
            for (layer, kind), x in acts.items():
                g = prepared.groups[layer, kind]
                xs = x * g.q.act_scale
                picked = selector.select_bucket(xs, k, selector.bucket_bounds(g.thresholds, k))
                static = selector.select_static(xs, k, g.mean_abs)
                exact = selector.select_exact(xs, k)
                by_kind.setdefault(kind, []).append((recall(picked, exact), recall(static, exact)))
            for kind, values in by_kind.items():
                rows.append({"domain": domain, "k_chunk": k, "group": kind, "layers": len(values),
                             "bucket_recall": sum(v[0] for v in values) / len(values),
                             "static_recall": sum(v[1] for v in values) / len(values)})
                print(f"{domain:>3} k_chunk {k:>3} {kind:<8} bucket recall {rows[-1]['bucket_recall']:.3f}  "
                      f"static {rows[-1]['static_recall']:.3f}")
    out = {**run_meta(), "config": a.config, "model": model.source, "positions": positions, "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
