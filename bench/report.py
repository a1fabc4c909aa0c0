"""Markdown tables for the README, read from the committed bench JSON (so no number is typed by hand).

    python bench/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def quality_table(path: Path) -> str:
    d = json.loads(path.read_text())
    rows = d["rows"]
    plain = [r for r in rows if r["selection"] == "none"]
    lines = [f"**{d['model']}** — {d['eval_tokens']} evaluation tokens, windows of {d['ctx']}, "
             f"calibration {d['calibration_tokens']} tokens; {d['device']}, commit {d['commit'][:7]} "
             f"(`{path.relative_to(RESULTS.parent.parent)}`)", "",
             "| model | perplexity |", "|---|---:|"]
    for r in plain:
        name = "reference (dequantized GGUF)" if r["method"] == "reference" else f"{r['method'].upper()} {r['bits']:g}-bit"
        lines.append(f"| {name} | {r['ppl']:.2f} |")
    for method in ("awq", "rtn"):
        dyn = [r for r in rows if r["method"] == method and r["bits"] == 3 and r["selection"] != "none"]
        if not dyn:
            continue
        modes = [m for m in ("bucket", "exact", "static") if any(r["selection"] == m for r in dyn)]
        ks = sorted({r["k_chunk"] for r in dyn})
        lines += ["", f"{method.upper()} 3-bit + DecDEC (k_chunk per 1024 channels):", "",
                  "| selection | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
        for m in modes:
            cells = [next(f"{r['ppl']:.2f}" for r in dyn if r["selection"] == m and r["k_chunk"] == k) for k in ks]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parity_table(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = ["| model | tokens | top-1 agreement | max abs logit diff |", "|---|---:|---:|---:|"]
    for r in d["rows"]:
        lines.append(f"| {r['model']} | {r['tokens']} | {r['top1_agreement']:.1%} | {r['max_abs_logit_diff']:.1e} |")
    return "\n".join(lines)


def cpu_step_table(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = [f"CPU figure ({d['device']}, {d['cpu_threads']} threads, float32 reference executor), "
             f"{d['model']} {d['quant']['method'].upper()} {d['quant']['bits']:g}-bit:", "",
             "| decode | tokens/s | ms/step |", "|---|---:|---:|"]
    for r in d["rows"]:
        what = "base only" if r["selection"] == "none" else f"DecDEC, k_chunk {r['k_chunk']}"
        lines.append(f"| {what} | {r['tokens_per_s']:.2f} | {r['median_step_ms']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    for path in sorted(RESULTS.glob("quality_*.json")):
        print(quality_table(path), end="\n\n")
    if (RESULTS / "parity.json").exists():
        print(parity_table(RESULTS / "parity.json"), end="\n\n")
    for path in sorted(RESULTS.glob("cpu_step_*.json")):
        print(cpu_step_table(path), end="\n\n")


if __name__ == "__main__":
    main()
