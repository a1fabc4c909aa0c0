"""Perplexity of RTN, AWQ and the robust quantizer at 3 bits, alone and + DecDEC (bucket selection)
over k_chunk, on in-domain text (the evaluation half of the calibration corpus, pydoc) and
off-domain text (stdlib source code, 'pysource', see models/corpus.py), for one packaged model.

The robust quantizer scores its choices after the compensation of the k_chunk it is prepared for,
so it is prepared once per k_chunk and evaluated at that k_chunk ('quant_k' of a row); robust
prepared for k_chunk 0 is also evaluated at the largest k_chunk, the ablation that shows what
knowing the k_chunk buys. Every preparation is forced (timed, never stale artifacts).

    python bench/quality.py --model gemma3-270m --tokens 8190 --ctx 512 --out bench/results/quality_gemma3-270m_8k.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.meta import run_meta  # noqa: E402
from decdec.config import load_config  # noqa: E402
from decdec.models.corpus import corpus_text, token_windows  # noqa: E402
from decdec.models.loader import load_model  # noqa: E402
from decdec.models.prepare import prepare  # noqa: E402
from decdec.runtime.evaluate import decdec_linear, dense_groups, perplexity  # noqa: E402

DOMAINS = {"in": "pydoc", "off": "pysource"}
BITS = 3


def domain_windows(model, ctx: int, tokens: int) -> tuple[dict, dict]:
    """Per domain of DOMAINS: the evaluation text's token windows, and what the results file records of it."""
    windows, meta = {}, {}
    for domain, corpus in DOMAINS.items():
        text = corpus_text(corpus, "eval")
        windows[domain] = token_windows(model.tokenizer, text, ctx, tokens)
        meta[domain] = {"corpus": corpus, "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                        "tokens": sum(w.shape[0] - 1 for w in windows[domain])}
    return windows, meta


def points(ks: list[int]) -> list[tuple[str, int | None, list[int]]]:
    """(method, the k_chunk robust is prepared for, the k_chunks evaluated), most telling first."""
    return [("rtn", None, [0, *ks]), ("awq", None, [0, *ks]), ("robust", ks[-1], [ks[-1]]),
            ("robust", 0, [0, ks[-1]]), *(("robust", k, [k]) for k in reversed(ks[:-1]))]


def kept(method: str, quant_k, keep: set[str]) -> bool:
    """Whether --keep names this preparation: its method, or method@quant_k."""
    return method in keep or f"{method}@{quant_k}" in keep  # quant_k: the row's int, or the text of a timing's key


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", type=int, default=1022, help="evaluation tokens per domain (1022: two windows of 512)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--k-chunk", default="8,16,32")
    ap.add_argument("--out", required=True)
    ap.add_argument("--keep", default="", help="methods (or method@quant_k) whose rows to keep from an earlier --out "
                    "(e.g. rtn,awq,robust@0 when only the robust quantizer's k-aware choice changed); their commit "
                    "stays in 'kept_from'")
    a = ap.parse_args()
    ks = sorted(int(k) for k in a.k_chunk.split(","))
    model = load_model(a.model)
    result = {**run_meta(), "model": a.model, "bits": BITS, "ctx": a.ctx, "calibration_tokens": a.calib_tokens,
              "domains": {}, "prepare_seconds": {}, "rows": []}  # provenance of the code that ran, taken at the start
    keep = set(filter(None, a.keep.split(",")))
    if keep:
        old = json.loads(Path(a.out).read_text())
        origin = old.get("kept_from") if keep <= set(old.get("kept_from", {}).get("methods", ())) else None
        origin = origin or old  # rows the earlier file had kept itself come from where it had them
        result["kept_from"] = {"commit": origin["commit"], "command": origin["command"], "methods": sorted(keep)}
        result["rows"] = [r for r in old["rows"] if kept(r["method"], r["quant_k"], keep | {"reference"})]
        result["prepare_seconds"] = {m: t for m, t in old["prepare_seconds"].items() if kept(*m.partition("@")[::2], keep)}
    windows, result["domains"] = domain_windows(model, a.ctx, a.tokens)
    started = time.time()

    def add(row: dict, linear) -> None:
        for domain, ws in windows.items():
            ppl, tokens = perplexity(model.args, model.weights, ws, linear, progress=False)
            result["rows"].append({**row, "domain": domain, "ppl": ppl, "tokens": tokens})
            print(f"{domain:>3} {row['method']:>9} quant_k={row['quant_k']} k={row['k_chunk']:<3} ppl {ppl:.3f}", flush=True)
        result["seconds"] = round(time.time() - started)
        Path(a.out).write_text(json.dumps(result, indent=1))  # partial results survive

    if not keep:
        add({"method": "reference", "quant_k": None, "bits": 16, "selection": "none", "k_chunk": 0}, None)
    for method, quant_k, eval_ks in (p for p in points(ks) if not kept(p[0], p[1], keep)):
        cfg = load_config({
            "model": {"source": a.model},
            "quant": {"method": method, "bits": BITS},
            "decdec": {"k_chunk": quant_k or 0},
            "calibration": {"tokens": a.calib_tokens, "ctx": a.ctx},
        })
        t = time.time()
        groups = dense_groups(prepare(cfg, force=True, progress=False, model=model))
        result["prepare_seconds"][f"{method}" if quant_k is None else f"{method}@{quant_k}"] = round(time.time() - t, 1)
        for k in eval_ks:
            selection = "bucket" if k else "none"
            add({"method": method, "quant_k": quant_k, "bits": BITS, "selection": selection, "k_chunk": k},
                decdec_linear(groups, selection, k))
    result["complete"] = True
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
