"""Perplexity at the plans an engine run timed (bench/engine.py), written into its rows' `ppl`, so one
file shows each plan's speed and quality side by side.

    python bench/plan_quality.py --engine bench/results/engine_h100.json [--models gemma3-270m,smollm2-135m]
        [--tokens 1022] [--ctx 512]

For each packaged model whose shapes the engine run timed (Llama-3-8B's rows are a synthetic model:
their ppl stays null), on the CPU (`runtime.evaluate`: DecDEC simulated exactly as the kernels select):
  ours          the default quantizer (robust) at 3 bits, planned for k_chunk 0 as it is under a tuner
                target, with DecDEC (bucket selection) at the row's k_chunk per group; none on the base row
  ours-3.5bit   the same quantizer at 3.5 bits (the more sensitive half of the layers at 4), no DecDEC
  ours-4bit     ... at 4 bits
Texts: the calibration corpus' evaluation half (pydoc, in-domain) into `ppl` and CPython's source code
(pysource, off-domain: unlike the calibration text) into `ppl_off`, `--tokens` predicted tokens each in
windows of `--ctx`. The file gains "plan_quality" (meta of this run: commit, command, texts) beside its runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.meta import run_meta  # noqa: E402
from decdec.config import load_config  # noqa: E402
from decdec.models.loader import load_model  # noqa: E402
from decdec.models.prepare import prepare  # noqa: E402
from decdec.runtime.evaluate import decdec_linear, dense_groups, eval_windows, perplexity  # noqa: E402

BITS = {"ours": 3, "ours-3.5bit": 3.5, "ours-4bit": 4}


def plan_of(row: dict) -> tuple:
    """A row's DecDEC plan as a hashable ((kind, bits), k_chunk) tuple; () without compensation."""
    if row["system"] != "ours" or "k_chunk" not in row:
        return ()
    return tuple(sorted(((key.split("@")[0], int(key.split("@")[1])), k) for key, k in row["k_chunk"].items()))


TEXTS = {"ppl": "pydoc", "ppl_off": "pysource"}  # row key -> evaluation corpus


def model_ppl(name: str, rows: list[dict], tokens: int, ctx: int) -> dict[tuple, float]:
    """(row key, bits, plan) -> perplexity on that key's text for every distinct plan of `rows` (one model's)."""
    model = load_model(name)
    out = {}
    def config(bits, corpus: str):
        return load_config({"model": {"source": name}, "quant": {"method": "robust", "bits": bits},
                            "decdec": {"k_chunk": 0}, "eval": {"corpus": corpus, "tokens": tokens, "ctx": ctx}})

    for bits in sorted({BITS[r["system"]] for r in rows}):
        prepared = prepare(config(bits, TEXTS["ppl"]), model=model)  # the artifacts do not depend on the text
        groups = dense_groups(prepared)
        for key, corpus in TEXTS.items():
            windows = eval_windows(dataclasses.replace(prepared, config=config(bits, corpus)))
            for plan in sorted({plan_of(r) for r in rows if BITS[r["system"]] == bits}):
                linear = decdec_linear(groups, "bucket", dict(plan)) if plan else decdec_linear(groups)
                out[key, bits, plan], _ = perplexity(prepared.model.args, prepared.model.weights, windows, linear,
                                                     desc=f"{name} {bits}-bit {dict(plan) or 'base'} {corpus}")
                print(f"{name} {bits}-bit {dict(plan) or 'base'} {corpus}: ppl {out[key, bits, plan]:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", required=True, help="a bench/engine.py results file (rewritten in place)")
    ap.add_argument("--models", default="gemma3-270m,smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1022)
    ap.add_argument("--ctx", type=int, default=512)
    a = ap.parse_args()
    path = Path(a.engine)
    d = json.loads(path.read_text())
    d["plan_quality"] = {**run_meta(), "texts": {key: {"corpus": corpus, "split": "eval", "tokens": a.tokens,
                                                        "ctx": a.ctx} for key, corpus in TEXTS.items()},
                         "quantizer": "robust, planned for k_chunk 0", "selection": "bucket"}
    for name in a.models.split(","):
        rows = [r for r in d["rows"] if r["model"] == name and r["system"] in BITS and "error" not in r]
        if not rows:
            print(f"{name}: no rows of ours in {path}", flush=True)
            continue
        ppl = model_ppl(name, rows, a.tokens, a.ctx)
        for r in rows:
            for key in TEXTS:
                r[key] = ppl[key, BITS[r["system"]], plan_of(r)]
        path.write_text(json.dumps(d, indent=1))


if __name__ == "__main__":
    main()
