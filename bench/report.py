"""Markdown tables for the README and docs/RESULTS.md, read from the committed bench JSON (so no number
is typed by hand).

    python bench/report.py --out docs/RESULTS.md    # the whole results page
    python bench/report.py --summary                # the README's end-to-end summary
    python bench/report.py                          # the whole page on stdout
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(*columns: str) -> list[str]:
    """A markdown table head: the first column left-aligned, the numeric ones right-aligned."""
    return [row(*columns), "|---|" + "---:|" * (len(columns) - 1)]


def source(path: Path) -> str:
    return f"`{path.relative_to(RESULTS.parent.parent)}`"


QUALITY_LINES = (  # (label, method, quant_k: None for all, "k" for the evaluated k_chunk, or a number)
    ("RTN", "rtn", None), ("AWQ", "awq", None), ("robust", "robust", "k"), ("robust, k-unaware", "robust", 0))


def quality_table(path: Path) -> str:
    """Perplexity per quantizer (rows) and domain x k_chunk (columns), then the issue-19 goal checks."""
    d = json.loads(path.read_text())
    rows, ks = d["rows"], sorted({r["k_chunk"] for r in d["rows"]})
    domains = list(d["domains"])

    def ppl(method: str, quant_k, domain: str, k: int) -> float | None:
        want = k if quant_k == "k" else quant_k
        return next((r["ppl"] for r in rows if r["method"] == method and r["domain"] == domain and r["k_chunk"] == k
                     and (want is None or r["quant_k"] == want)), None)

    texts = ", ".join(f"{dom}-domain `{v['corpus']}` {v['tokens']} tokens" for dom, v in d["domains"].items())
    lines = [f"**{d['model']}** {d['bits']}-bit + DecDEC (bucket selection, k_chunk per 1024 channels): {texts}, "
             f"windows of {d['ctx']}, calibration {d['calibration_tokens']} tokens of `pydoc`; {d['device']}, "
             f"commit {d['commit'][:7]} ({source(path)})", "",
             *header("quantizer", *(f"{dom} k={k}" for dom in domains for k in ks))]
    ref = {dom: ppl("reference", None, dom, 0) for dom in domains}
    lines.append(row("reference", *(f"{ref[dom]:.2f}" if k == 0 and ref[dom] else "" for dom in domains for k in ks)))
    for label, method, quant_k in QUALITY_LINES:
        cells = [ppl(method, quant_k, dom, k) for dom in domains for k in ks]
        if any(cells):
            lines.append(row(label, *(f"{c:.2f}" if c else "–" for c in cells)))
    checks = []
    for dom in domains:
        for k in ks:
            best, robust = min(filter(None, (ppl(m, None, dom, k) for m in ("rtn", "awq"))), default=None), ppl("robust", "k", dom, k)
            if best and robust:
                checks.append(f"{dom} k={k} {'✓' if robust <= 1.01 * best else '✗'} ({robust / best - 1:+.1%})")
    rtn, top, off = ppl("rtn", None, "off", 0), ppl("robust", "k", "off", ks[-1]), ref.get("off")
    recovery = f"; off-domain k={ks[-1]} recovers {(rtn - top) / (rtn - off):.0%} of RTN's gap (goal 65 %)" if rtn and top and off else ""
    lines += ["", f"robust ≤ min(RTN, AWQ) + 1 %: {', '.join(checks)}{recovery}. "
              f"Preparation seconds: {', '.join(f'{m} {t:g}' for m, t in d['prepare_seconds'].items())}."]
    return "\n".join(lines)


def lm_head_table(path: Path) -> str:
    """Perplexity with the lm_head as it is, int8 and 4-bit (rows) for each system and domain (columns)."""
    d = json.loads(path.read_text())
    systems, domains = list(dict.fromkeys(r["system"] for r in d["rows"])), list(d["domains"])
    ppl = {(r["lm_head"], r["system"], r["domain"]): r["ppl"] for r in d["rows"]}
    texts = ", ".join(f"{dom}-domain `{v['corpus']}` {v['tokens']} tokens" for dom, v in d["domains"].items())
    lines = [f"**{d['model']}**, the lm_head quantized (`bench/lm_head_quality.py`): {texts}, windows of {d['ctx']}; "
             f"{d['device']}, commit {d['commit'][:7]} ({source(path)})", "",
             *header("lm_head", "share of the step's weight bytes", *(f"{s} {dom}" for s in systems for dom in domains))]
    for head, b in d["bytes"].items():
        cells = [ppl.get((head, s, dom)) for s in systems for dom in domains]
        lines.append(row(head, f"{b['lm_head_share']:.0%}", *(f"{c:.2f}" if c else "–" for c in cells)))
    return "\n".join(lines)


def parity_table(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = header("model", "tokens", "top-1 agreement", "max abs logit diff")
    for r in d["rows"]:
        lines.append(row(r["model"], r["tokens"], f"{r['top1_agreement']:.1%}", f"{r['max_abs_logit_diff']:.1e}"))
    return "\n".join(lines)


def cpu_step_table(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = [f"CPU figure ({d['device']}, {d['cpu_threads']} threads, float32 reference executor), "
             f"{d['model']} {d['quant']['method'].upper()} {d['quant']['bits']:g}-bit:", "",
             *header("decode", "tokens/s", "ms/step")]
    for r in d["rows"]:
        what = "base only" if r["selection"] == "none" else f"DecDEC, k_chunk {r['k_chunk']}"
        lines.append(row(what, f"{r['tokens_per_s']:.2f}", f"{r['median_step_ms']:.1f}"))
    return "\n".join(lines)


def gpu_tables(path: Path) -> str:
    d = json.loads(path.read_text())
    env, bw = d["env"], d["bandwidth"]
    zero_copy = {k[len("zero_copy_read_"):-len("_GBps")]: v for k, v in bw.items() if k.startswith("zero_copy_read")}
    peak = max(zero_copy.values())  # one reading can come out low; the best of the run is the ceiling
    out = [f"{env['device']}, torch {env['torch']}, numba-cuda {env['numba_cuda']} ({source(path)}, commit "
           f"{d.get('meta', {}).get('commit', env.get('commit', '?'))[:7]}); measured in the same run: HBM read "
           f"{bw['hbm_read_GBps']:.0f} GB/s, zero-copy read "
           + ", ".join(f"{v:.1f} GB/s ({k})" for k, v in zero_copy.items()) + ".", "",
           "Base GEMV, batch 1, inside CUDA graphs, weights rotated past L2 (µs; fraction of measured HBM read):", "",
           *header("out x in", "ours 3-bit", "ours 4-bit", "torch int4", "torch fp16")]
    shapes = sorted({(r["out"], r["in"]) for r in d.get("gemv", [])}, key=lambda s: -s[0] * s[1])
    if not shapes:
        out = out[:2] + ["Quick run (`--quick`): the correction at 4096x4096 and the pair at two shapes only."]
    for o, i in shapes:
        cell = {}
        for r in d["gemv"]:
            if (r["out"], r["in"]) == (o, i) and "us" in r:  # rows with "error" did not run
                key = r["bits"] if r["kernel"] == "numba" else r["kernel"]
                frac = f" ({r['frac_hbm_read']:.0%})" if "frac_hbm_read" in r else ""
                cell[key] = f"{r['us']:.1f}{frac}"
        out.append(row(f"{o}x{i}", cell.get(3, "-"), cell.get(4, "-"),
                       cell.get("torch _weight_int4pack_mm", "fails"), cell.get("torch F.linear fp16", "-")))
    if not d.get("correction"):  # a run of some sections only (`--only`)
        return "\n".join(out)
    out += ["", "Correction kernel alone (zero-copy fetch + dequantize + GEMV), best n_tb per k_chunk: µs, PCIe GB/s, "
            f"fraction of the best zero-copy read of the run ({peak:.1f} GB/s):", "", *header("out x in", "k_chunk", "n_tb", "µs", "GB/s", "of peak")]
    for (o, i) in sorted({(r["out"], r["in"]) for r in d["correction"]}):
        for k in sorted({r["k_chunk"] for r in d["correction"]}):
            rs = [r for r in d["correction"] if (r["out"], r["in"], r["k_chunk"]) == (o, i, k)]
            b = min(rs, key=lambda r: r["us"])
            out.append(row(f"{o}x{i}", k, b["n_tb"], f"{b['us']:.1f}", f"{b['pcie_GBps']:.1f}",
                           f"{b['pcie_GBps'] / peak:.0%}"))
    ov = [r for r in d["overlap"] if r["side_priority"] == -1 and r["bits"] == 3]
    ks = sorted({r["k_chunk"] for r in ov})
    out += ["", "Base GEMV (3-bit) and correction concurrently, correction on a high-priority side stream: slowdown of "
            "the pair over the base alone, best n_tb in brackets:", "",
            *header("out x in", "base µs", *(f"k={k}" for k in ks))]
    for (o, i) in sorted({(r["out"], r["in"]) for r in ov}, key=lambda s: -s[0] * s[1]):
        rs = [r for r in ov if (r["out"], r["in"]) == (o, i)]
        cells = []
        for k in ks:
            b = min((r for r in rs if r["k_chunk"] == k), key=lambda r: r["slowdown"])
            cells.append(f"{b['slowdown']:+.0%} ({b['n_tb']})")
        out.append(row(f"{o}x{i}", f"{rs[0]['base_us']:.1f}", *cells))
    out += ["", "Zero-copy against memcpy (one `cudaMemcpyAsync` per selected row):", "",
            *header("out x in", "k_chunk", "rows", "memcpy µs", "zero-copy correction µs")]
    for r in d["memcpy"]:
        out.append(row(f"{r['out']}x{r['in']}", r["k_chunk"], r["rows"], f"{r['memcpy_rows_us']:.1f}",
                       f"{r['zero_copy_correction_us']:.1f}"))
    return "\n".join(out)


def recall_table(path: Path) -> str:
    """bench/selector_recall.py: recall per (domain, group) and k_chunk; where the file has them, the
    activations against the calibrated edges and the error removed, as a second table."""
    d = json.loads(path.read_text())
    ks = sorted({r["k_chunk"] for r in d["rows"]})

    def table(cell) -> list[str]:
        lines = header("domain, group", *(f"k={k}" for k in ks))
        for dom in dict.fromkeys(r["domain"] for r in d["rows"]):
            for g in ("qkv", "o", "gate_up", "down"):
                lines.append(row(f"{dom}, {g}", *(next(cell(r) for r in d["rows"] if r["domain"] == dom
                                                       and r["group"] == g and r["k_chunk"] == k) for k in ks)))
        return lines

    out = [f"Selector recall against exact top-k, {d['model']}, positions {d['positions']} of in-domain and "
           f"off-domain evaluation text ({source(path)}, commit {d['commit'][:7]}): bucket (static in brackets)", "",
           *table(lambda r: f"{r['bucket_recall']:.2f} ({r['static_recall']:.2f})")]
    if "error_removed" in d["rows"][0]:
        out += ["", f"Against the calibrated bucket edges, and the share of each group's quantization error on its outputs "
                f"that the compensation removes (same activations; {source(path)}): above the top edge per pick / "
                "exact top-k below the k-th edge (coarse buckets) / error removed", "",
                *table(lambda r: f"{r['above_top']:.2f} / {r['exact_in_coarse']:.2f} / {r['error_removed']:.0%}")]
    return "\n".join(out)


def k_warps_table(path: Path) -> str:
    """Per shape: the default plan (rows per warp R, K warps kw, K blocks kb) against the best plan of one
    K warp (as before K warps existed) and torch's int4 kernel, 4-bit, and the default at 3 bits."""
    d = json.loads(path.read_text())
    out = [f"{d['device']}, HBM read {d['hbm_read_GBps']:.0f} GB/s in the same run ({source(path)}, commit "
           f"{d['meta']['commit'][:7]}; µs, fraction of HBM read):", "",
           *header("out x in", "4-bit default", "R, kw, kb", "4-bit, 1 K warp", "torch int4", "torch / ours",
                   "3-bit default", "3-bit, 1 K warp")]
    cell = lambda r: f"{r['us']:.1f} ({r['frac_hbm_read']:.0%})"  # noqa: E731
    for o, i in dict.fromkeys((r["out"], r["in"]) for r in d["rows"]):
        rs = [r for r in d["rows"] if (r["out"], r["in"]) == (o, i)]
        default = {b: next(r for r in rs if r["bits"] == b and r["variant"] == "default") for b in (3, 4)}
        one_kw = {b: min((r for r in rs if r["bits"] == b and r.get("k_warps") == 1 and "first load" not in r["variant"]),
                         key=lambda r: r["us"]) for b in (3, 4)}
        t4 = next((r for r in rs if r["variant"] == "torch int4"), None)
        g = default[4]
        out.append(row(f"{o}x{i}", cell(g), f"{g['rows_per_warp']}, {g['k_warps']}, {g['k_blocks']}", cell(one_kw[4]),
                       f"{t4['us']:.1f}" if t4 else "fails", f"{t4['us'] / g['us']:.2f}x" if t4 else "",
                       cell(default[3]), cell(one_kw[3])))
    return "\n".join(out)


KW_RUNS = ("gemv_variants_b5901af_h200.json",)  # the base GEMV with and without K warps
LAYOUT_RUNS = ("gemv_3cc37ce_h100.json", "gemv_40f36df_h100.json")  # 3-bit layouts, one device call


def layout_table(new_path: Path, old_path: Path) -> str:
    """Default plans of two bench/gemv_variants.py runs of one device call: the 3-bit layout of whole
    codes (new) beside the low- and high-bit planes (old), with 4-bit and torch's int4 kernel."""
    new, old = (json.loads(p.read_text()) for p in (new_path, old_path))
    us = lambda d, o, i, b, v="default": next((r["us"] for r in d["rows"]  # noqa: E731
                                               if (r["out"], r["in"], r["bits"], r["variant"]) == (o, i, b, v)), None)
    f = lambda x: "" if x is None else f"{x:.1f}"  # noqa: E731
    lines = [f"The base GEMV's 3-bit layouts, µs per launch in CUDA graphs, weights rotated past L2 ({source(new_path)}, "
             f"{source(old_path)}; {new['device']}, one device call):", "",
             *header("out x in", "3-bit planes", "3-bit whole codes", "with L2 prefetch", "4-bit", "torch int4")]
    for o, i in dict.fromkeys((r["out"], r["in"]) for r in new["rows"]):
        lines.append(row(f"{o}x{i}", f(us(old, o, i, 3)), f(us(new, o, i, 3)), f(us(new, o, i, 3, "L2 prefetch")),
                         f(us(new, o, i, 4)), f(us(new, o, i, 4, "torch int4"))))
    return "\n".join(lines)
GEMV_RUN = "gemv_f3926e7_h100.json"  # the base GEMV's default plans beside torch's int4 kernel


def gemv_table(path: Path) -> str:
    """A bench/gemv_variants.py --default-only run: our default plans at 3 and 4 bits beside torch int4."""
    d = json.loads(path.read_text())
    us = {(r["out"], r["in"], r["bits"], r["variant"]): r["us"] for r in d["rows"]}
    frac = {(r["out"], r["in"]): r["frac_hbm_read"] for r in d["rows"] if r["bits"] == 3 and r["variant"] == "default"}
    lines = [f"The base GEMV's default plans, µs per launch in CUDA graphs, weights rotated past L2 ({source(path)}; "
             f"{d['device']}; HBM read {d['hbm_read_GBps']:.0f} GB/s):", "",
             *header("out x in", "3-bit", "4-bit", "torch int4", "torch int4 / 3-bit", "3-bit, share of HBM read")]
    for o, i in dict.fromkeys((r["out"], r["in"]) for r in d["rows"]):
        three, four, int4 = (us.get((o, i, b, v)) for b, v in ((3, "default"), (4, "default"), (4, "torch int4")))
        lines.append(row(f"{o}x{i}", f"{three:.1f}", f"{four:.1f}", f"{int4:.1f}", f"{int4 / three:.2f}x",
                         f"{frac[o, i]:.0%}"))
    return "\n".join(lines)


def step_profile_table(path: Path) -> str:
    """bench/step_profile.py: where our decode step goes, per op, and the glue share."""
    d = json.loads(path.read_text())
    lines = []
    for r in d["rows"]:
        lines += [f"Where {r['model']}'s decode step goes (k_chunk {r.get('k_chunk', 0)}; {source(path)}; {d['device']}, "
                  f"commit {d['commit'][:7]}): µs per step in the profiled graph ({r['span_us']:.0f} µs with two timing "
                  f"events per op; the plain replay takes {r['replay_us']:.0f} µs), glue (all but the base GEMVs and the "
                  f"lm_head) {r['glue_share']:.1%} of it:", "", *header("op", "µs", "share")]
        lines += [row(op, f"{us:.1f}", _pct(us / r["span_us"])) for op, us in r["ops_us"].items()] + [""]
    return "\n".join(lines).rstrip()


def attention_table(path: Path) -> str:
    """bench/attention_tiles.py: decode attention per launch for each tile and split count."""
    d = json.loads(path.read_text())
    positions = list(d["rows"][0]["us"])
    lines = [f"Decode attention's tile (positions a block takes at once) and splits, µs per launch in CUDA graphs "
             f"over 4 layers' caches ({source(path)}; {d['device']}; max_seq 8192; * the plan at that run's "
             "commit):", "", *header("model", "tile", "splits", *(f"KV {p}" for p in positions))]
    for r in d["rows"]:
        lines.append(row(r["model"], f"{r['tile']}{' *' if r['default'] else ''}", r["splits"],
                         *(f"{r['us'][p]:.1f}" for p in positions)))
    return "\n".join(lines)


def variants_table(path: Path, what: str) -> str:
    """A bench/gemv_variants.py run: every variant's µs per launch and share of the HBM read."""
    d = json.loads(path.read_text())
    lines = [f"{what} ({source(path)}; {d['device']}; µs per launch in CUDA graphs, weights rotated past L2):", "",
             *header("out x in", "bits", "variant", "rows per warp", "tiles per block", "µs", "share of HBM read")]
    for r in d["rows"]:
        lines.append(row(f"{r['out']}x{r['in']}", r["bits"], r["variant"], r.get("rows_per_warp", ""),
                         r.get("tiles_per_block", ""), f"{r['us']:.1f}", _pct(r.get("frac_hbm_read"))))
    return "\n".join(lines)


RING_RUN = "gemv_ring_5489f3f_h100.json"  # the GEMV's weights through a cp.async ring (not merged)


def pdl_table(path: Path) -> str:
    """bench/pdl.py: our base step's graph with programmatic edges and without, alternated in one run."""
    d = json.loads(path.read_text())
    lines = [f"Programmatic dependent launch: the same step graph with programmatic edges and without, timed "
             f"alternately ({source(path)}; {d['device']}; ms per step, median):", "",
             *header("model", "KV length", "edges", "device, with", "device, without", "wall, with", "wall, without",
                     "logits equal")]
    by = {(r["model"], r["position"], r["mode"]): r for r in d["rows"]}
    for model, pos in dict.fromkeys((r["model"], r["position"]) for r in d["rows"]):
        on, off = by[model, pos, "pdl"], by[model, pos, "plain"]
        lines.append(row(model, pos + 1, on["programmatic_edges"], f"{on['device_ms']:.3f}", f"{off['device_ms']:.3f}",
                         f"{on['wall_ms']:.3f}", f"{off['wall_ms']:.3f}", "yes" if on["logits_equal"] else "NO"))
    return "\n".join(lines)


def pair_table(path: Path) -> str:
    """bench/pair_slots.py: a GEMV beside a correction, planned for every SM or for those the
    correction's blocks leave it, and the correction alone (stand-alone: its passes in turn)."""
    d = json.loads(path.read_text())
    lines = [f"A GEMV beside a correction ({source(path)}; {d['device']}, commit {d['commit'][:7]}; 3-bit, µs per "
             "launch pair in CUDA graphs; blocks = row blocks x selection passes; default: the GEMV planned for "
             "every SM, beside: for the SMs the correction's blocks leave it):", "",
             *header("out x in", "GEMV alone", "k_chunk", "blocks", "correction alone", "pair, default",
                     "pair, beside")]
    rows = d["rows"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        base = next(r["us"] for r in rows if r["shape"] == shape and r["what"] == "base")
        for alone in (r for r in rows if r["shape"] == shape and r["what"] == "corr alone"):
            pair = {r["gemv_plan"]: r for r in rows if r["shape"] == shape and r["what"] == "pair"
                    and (r["k_chunk"], r["n_tb"]) == (alone["k_chunk"], alone["n_tb"])}
            lines.append(row(shape, f"{base:.1f}", alone["k_chunk"], f"{alone['n_tb']} x {pair['default']['parts']}",
                             f"{alone['us']:.1f}", f"{pair['default']['us']:.1f}", f"{pair['beside']['us']:.1f}"))
    return "\n".join(lines)


# the batched staging loads (263685b) beside the tree before them (9233bec), one run (bench/gemv_variants.py)
STAGING_RUNS = ("gemv_9233bec_h100.json", "gemv_263685b_h100.json")


def staging_table(before: Path, after: Path) -> str:
    """Two --default-only runs of one machine session: 3-bit default plans before and after a change."""
    d0, d1 = (json.loads(p.read_text()) for p in (before, after))
    us0 = {(r["out"], r["in"]): r["us"] for r in d0["rows"] if r["variant"] == "default"}
    lines = [f"The base GEMV's staging loads issued together (commit {d1['commit']}) beside one by one (commit "
             f"{d0['commit']}), 3-bit default plans, µs per launch, one machine session ({source(before)}, "
             f"{source(after)}; {d1['device']}):", "", *header("out x in", "one by one", "together", "change")]
    for r in d1["rows"]:
        if r["variant"] == "default":
            a, b = us0[r["out"], r["in"]], r["us"]
            lines.append(row(f"{r['out']}x{r['in']}", f"{a:.1f}", f"{b:.1f}", f"{b / a - 1:+.0%}"))
    return "\n".join(lines)


BASE_AB_RUNS = {  # a change to our base step -> (the step before it, after it), timed in one machine session
    "the register-tiled attention": ("base_step_86b1aa9_h100.json", "engine_h100_d5a5080.json"),
    "the attention's split combine in 16-byte loads": ("base_step_736a89e_h100.json", "engine_h100_844aad3.json"),
    "the glue folded into the GEMV launches": ("base_step_64152f1_h100.json", "engine_h100.json"),
}
# k_chunk 1 on every group with the readers of compensated outputs launched early (86b1aa9) and not (9dc08f9)
EDGE_RULE_RUNS = {"held back": "edge_rule_k1_9dc08f9_h100.json", "launched early": "edge_rule_k1_86b1aa9_h100.json"}


def base_ab_table(change: str, before: Path, after: Path) -> str:
    """Our base step before and after `change`, one machine session: per model and KV length, wall
    tokens/s (device tokens/s)."""
    d0, d1 = (json.loads(p.read_text()) for p in (before, after))
    after_rows = {(r["model"], r["kv_len"]): r for r in d1["rows"] if r["system"] == "ours" and _base(r)}
    commits = {x["id"]: x["commit"][:7] for x in d1["runs"]}
    lines = [f"Our base step with {change} (commit "
             f"{', '.join(sorted({commits[r['run']] for r in after_rows.values()}))}) "
             f"beside the one before it (commit {d0['commit']}), wall tokens/s (device tokens/s), one machine "
             f"session ({source(before)}, {source(after)}; {d0['device']}):", "",
             *header("model", "KV length", "before", "after", "change, device")]
    for r0 in d0["rows"]:
        r1 = after_rows[r0["model"], r0["kv_len"]]
        lines.append(row(r0["model"], r0["kv_len"], f"{r0['tokens_per_s']:.1f} ({r0['device_tokens_per_s']:.1f})",
                         f"{r1['tokens_per_s']:.1f} ({r1['device_tokens_per_s']:.1f})",
                         f"{r1['device_tokens_per_s'] / r0['device_tokens_per_s'] - 1:+.0%}"))
    return "\n".join(lines)


def edge_rule_table(runs: dict[str, Path]) -> str:
    """bench/engine.py --k-chunks 1 runs of two trees in one machine session: the step with k_chunk 1 on
    every group beside the base step, per tree."""
    lines = ["k_chunk 1 on every group, KV 256: the kernel that reads a compensated group's output held back "
             "(ordinary edges) or launched early (programmatic edges from both streams), one machine session:", "",
             *header("commit", "readers of compensated outputs", "base device tokens/s", "k_chunk 1", "slowdown", "file")]
    for readers, path in runs.items():
        d = json.loads(path.read_text())
        base = next(r for r in d["rows"] if "slowdown" not in r)
        k1 = next(r for r in d["rows"] if "slowdown" in r)
        lines.append(row(d["commit"], readers,
                         f"{base['device_tokens_per_s']:.1f}", f"{k1['device_tokens_per_s']:.1f}",
                         f"{k1['slowdown']:+.1%}", source(path)))
    return "\n".join(lines)


def fixed_cost_table(path: Path) -> str:
    """bench/fixed_cost.py: the least compensation (k_chunk 1) on one group kind at a time, timed in turns
    with the base step, and (--timeline) when each GEMV and correction start and end in the graph."""
    d = json.loads(path.read_text())
    chain = "Not merged (branch chain): the correction chained with its GEMV on one stream. " \
        if path.name.startswith("chain_") else ""
    lines = [f"{chain}The least compensation, k_chunk 1, {d['model']} at KV {d['position'] + 1} ({source(path)}; {d['device']}, "
             f"commit {d['commit'][:7]}; device time per step, CUDA graph replays in turns with the base step):", "",
             *header("groups compensated", "n_tb", "base ms", "step ms", "slowdown", "µs per group")]
    for r in d["rows"]:
        lines.append(row(", ".join(r["kinds"]), r["n_tb"], f"{r['base_ms']:.3f}", f"{r['step_ms']:.3f}",
                         f"{r['slowdown']:+.1%}", f"{r['extra_us_per_group']:.1f}"))
    timeline = d.get("timeline_us")
    if timeline:
        base, comp = timeline["base"], next(v for k, v in timeline.items() if k != "base")
        lines += ["", "Per group kind, µs after the kernel before it ends (CUPTI trace of replays; a negative start is "
                  "an early, programmatic launch, whose time includes its wait): the GEMV's end is its input-to-output "
                  "time, on the step's critical path:", "",
                  *header("kind", "base: GEMV start", "base: GEMV end", "k 1: correction start", "k 1: correction end",
                          "k 1: GEMV start", "k 1: GEMV end")]
        for kind, b in base.items():
            c = comp[kind]
            lines.append(row(kind, f"{b['gemv_start']:.1f}", f"{b['gemv_start'] + b['gemv_us']:.1f}",
                             f"{c['corr_start']:.1f}", f"{c['corr_start'] + c['corr_us']:.1f}",
                             f"{c['gemv_start']:.1f}", f"{c['gemv_start'] + c['gemv_us']:.1f}"))
    return "\n".join(lines)


# the correction's floor before and after the selection's rewrite (runs of bench/correction_floor.py)
FLOOR_RUNS = ("correction_floor_37bb371_h200.json", "correction_floor_1d0ca18_h200.json")


def floor_table(paths: list[Path]) -> str:
    """bench/correction_floor.py runs side by side: the fused kernel's parts and its stamped phases."""
    lines = ["Where the correction's time goes, k_chunk 8, n_tb 16, zero-copy tables rotated past L2 "
             f"({', '.join(source(p) for p in paths)}; µs per launch in CUDA graphs; phases from the stamped "
             "build, the slowest block):", "",
             *header("out x in", "commit", "k 0", "HBM table", "zero-copy", "selector alone", "select",
                     "fetch + FMA", "reduce + emit")]
    for path in paths:
        d = json.loads(path.read_text())
        for r in d["rows"]:
            if r["k_chunk"] != 8 or "phases" not in r:
                continue
            ph = r["phases"]
            lines.append(row(f"{r['out']}x{r['in']}", d["env"]["commit"][:7], f"{r['k0']:.1f}", f"{r['hbm']:.1f}",
                             f"{r['zeroN']:.1f}", f"{r['select']:.1f}", f"{ph['select_us']:.1f}",
                             f"{ph['fetch_us']:.1f}", f"{ph['emit_us'] + ph.get('prologue_us', 0):.1f}"))
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.0%}"


def _ks_dict(k_chunk: dict, n_tb: dict) -> str:
    """k_chunk (n_tb) per group kind in graph order, from bench/engine.py's 'kind@bits' keys."""
    cells = []
    for kind in ("qkv", "o", "gate_up", "down"):
        key = next((key for key in k_chunk if key.split("@")[0] == kind), None)
        cells.append("-" if key is None or not k_chunk[key] else f"{k_chunk[key]} ({n_tb[key]})")
    return " / ".join(cells)


def _engine_rows(d: dict) -> tuple[dict, list[dict]]:
    """bench/engine.py's rows, and (model, position) -> the anchor-int4 row (ratios are taken against it)."""
    int4 = {(r["model"], r["position"]): r for r in d["rows"] if r["system"] == "anchor-int4" and "error" not in r}
    return int4, d["rows"]


def _base(r: dict) -> bool:
    """A base step (no compensation): not a tuned target's row nor a fixed k_chunk's (which has a slowdown)."""
    return not r["target"] and "slowdown" not in r


def _engine_runs(path: Path, d: dict) -> list[str]:
    return [f"- run {x['id']}: {x['device']}, commit {x['commit'][:7]}, {x['date']}, torch {x['torch']}, "
            f"max_seq {x['max_seq']}, {x['steps']} timed steps, HBM read " + (f"{x['hbm_read_GBps']:.0f} GB/s" if x["hbm_read_GBps"] else "-")
            + f": `{x['command']}`" for x in d["runs"]] + [f"- file: {source(path)}"]


def engine_summary(path: Path) -> str:
    """The README's end-to-end table: per model, at the shortest KV length measured, our base step (and
    with the int8 lm_head, where measured) beside the anchor (wall tokens/s, token in and logits out), and
    ours / anchor-int4 both ways."""
    d = json.loads(path.read_text())
    int4, rows = _engine_rows(d)
    lm8 = any(r["system"] == "ours-lm8" for r in rows)  # its column only where a run measured it
    lines = [f"{d['device']}, batch 1, wall tokens/s (token in, logits on the host out); device tokens/s in "
             f"brackets ({source(path)}):", "",
             *header("model", "KV length", "ours 3-bit", *["ours, int8 lm_head"] * lm8, "anchor int4", "anchor bf16",
                     "ours / int4" + " (int8 lm_head)" * lm8, "ours / int4, device")]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and "error" not in r]
        if not mine:
            continue
        pos = min(r["position"] for r in mine)

        def cell(system: str) -> str:
            r = next((r for r in rows if r["model"] == model and r["system"] == system and _base(r)
                      and r.get("position", pos) == pos), None)
            if r is None:
                return "-"
            return "fails" if "error" in r else f"{r['tokens_per_s']:.1f} ({r['device_tokens_per_s']:.1f})"

        anchor = int4.get((model, pos))

        def ratio(key: str) -> str:  # "ours / anchor-int4 (ours-lm8 / anchor-int4)", "-" for one not measured
            if anchor is None:
                return ""
            ours = {r["system"]: f"{r[key] / anchor[key]:.2f}x" for r in mine
                    if r["system"] in ("ours", "ours-lm8") and _base(r) and r["position"] == pos}
            return ours.get("ours", "-") + (f" ({ours['ours-lm8']})" if "ours-lm8" in ours else "")

        lines.append(row(model, pos + 1, cell("ours"), *[cell("ours-lm8")] * lm8, cell("anchor-int4"),
                         cell("anchor-bf16"), ratio("tokens_per_s"), ratio("device_tokens_per_s")))
    return "\n".join(lines)


def engine_table(path: Path) -> str:
    """Every row of one bench/engine.py file: ours (base and tuned) beside the anchor, per model and KV
    length, with ours / anchor-int4 both ways and the tuner's plan."""
    d = json.loads(path.read_text())
    int4, rows = _engine_rows(d)
    max_seqs = sorted({x["max_seq"] for x in d["runs"]})
    paired = any("base_device_ms" in r for r in d["rows"])
    lines = [f"{d['device']}, batch 1, max_seq {' / '.join(map(str, max_seqs))}; wall = token id in, logits on the "
             "host out; device = CUDA events around the step alone; roofline = (weight + lm_head bytes) / measured "
             "HBM read / wall step; slowdown = device step over the base step at the same KV length"
             + (", the two timed in turns" if paired else "") + " (the tuner's prediction in brackets):", "",
             *header("model", "KV length", "system", "target", "tokens/s", "device tokens/s", "of roofline",
                     "ours / int4", "ours / int4, device", "slowdown (predicted)",
                     "k_chunk (n_tb): qkv / o / gate_up / down", "ppl in-domain", "ppl off-domain")]
    order = {"ours": 0, "ours-lm8": 1, "ours-3.5bit": 2, "ours-4bit": 3, "anchor-int4": 4, "anchor-bf16": 5}
    errors = []
    for r in sorted(rows, key=lambda r: (r["model"], r.get("position", math.inf), order[r["system"]], r["target"],
                                         "slowdown" in r)):
        target = (f"{r['target']:.1%}" if r["target"] else "base" if _base(r) and r["system"].startswith("ours")
                  else f"k_chunk {max(r['k_chunk'].values())}" if "k_chunk" in r else "")
        if "error" in r:
            what = "unreachable" if r["system"] == "ours" and r["target"] else "fails"
            errors.append(f"- {r['model']}, {r['system']}{f' at {target}' if r['target'] else ''}: {r['error'][:300]}")
            lines.append(row(r["model"], "", r["system"], target, f"{what} (below)", *[""] * 7))
            continue
        anchor = int4.get((r["model"], r["position"])) if r["system"] in ("ours", "ours-lm8") else None
        tuned = "slowdown" in r
        lines.append(row(
            r["model"], r["kv_len"], r["system"], target, f"{r['tokens_per_s']:.1f}", f"{r['device_tokens_per_s']:.1f}",
            _pct(r["frac_roofline"]),
            f"{r['tokens_per_s'] / anchor['tokens_per_s']:.2f}x" if anchor else "",
            f"{r['device_tokens_per_s'] / anchor['device_tokens_per_s']:.2f}x" if anchor else "",
            (f"{r['slowdown']:+.1%}" + (f" ({r['predicted_slowdown']:+.1%})" if "predicted_slowdown" in r else ""))
            if tuned else "",
            _ks_dict(r["k_chunk"], r["n_tb"]) if tuned else "",
            *(f"{r[key]:.2f}" if r.get(key) else "" for key in ("ppl", "ppl_off"))))
    q = d.get("plan_quality")
    texts = (q.get("texts") or {"ppl": q["text"]}) if q else {}
    ppl = ["- ppl: " + "; ".join(f"{t['corpus']} ({t['split']}, {'off' if key == 'ppl_off' else 'in'}-domain), "
                                  f"{t['tokens']} tokens in windows of {t['ctx']}" for key, t in texts.items())
           + f"; {q['quantizer']}, DecDEC simulated at the row's k_chunk with {q['selection']} selection; "
           f"{q['device']}, commit {q['commit'][:7]}: `{q['command']}`"] if q else []
    return "\n".join(lines + [""] + errors + _engine_runs(path, d) + ppl)


def engine_files() -> list[Path]:
    return sorted(RESULTS.glob("engine_*.json"))


def page() -> str:
    """The whole results page (docs/RESULTS.md): every table of every current results file, by section."""
    existing = lambda names: [RESULTS / n for n in names if (RESULTS / n).exists()]  # noqa: E731
    sections = {
        "End to end: our engine beside the anchor (`bench/engine.py`)":
            [engine_summary(p) for p in engine_files()] + [engine_table(p) for p in engine_files()],
        "Quality": [quality_table(p) for p in sorted(RESULTS.glob("quality_*.json"))]
                   + [lm_head_table(p) for p in sorted(RESULTS.glob("lm_head_quality_*.json"))]
                   + [parity_table(p) for p in existing(["parity.json"])]
                   + [recall_table(p) for p in sorted(RESULTS.glob("selector_recall_*.json"))],
        "CPU step": [cpu_step_table(p) for p in sorted(RESULTS.glob("cpu_step_*.json"))],
        "Where the GPU step goes (`bench/step_profile.py`)":
            [step_profile_table(p) for p in sorted(RESULTS.glob("step_profile_*.json"),  # newest run first
                                                   key=lambda p: json.loads(p.read_text())["date"], reverse=True)],
        "Kernels": [pdl_table(p) for p in sorted(RESULTS.glob("pdl_*.json"))]
                   + [pair_table(p) for p in sorted(RESULTS.glob("pair_slots_*.json"))]
                   + [attention_table(p) for p in sorted(RESULTS.glob("attention_tiles_*.json"))]
                   + [variants_table(p, "The base GEMV's weights through a cp.async ring of 2-4 steps per warp (not "
                                     "merged: slower at every shape) beside the default's one step held in registers")
                      for p in existing([RING_RUN])]
                   + [gemv_table(p) for p in existing([GEMV_RUN])]
                   + ([layout_table(*existing(LAYOUT_RUNS))] if len(existing(LAYOUT_RUNS)) == 2 else [])
                   + [k_warps_table(p) for p in existing(KW_RUNS)]
                   + ([staging_table(*existing(STAGING_RUNS))] if len(existing(STAGING_RUNS)) == 2 else [])
                   + [base_ab_table(change, *existing(runs)) for change, runs in BASE_AB_RUNS.items()
                      if len(existing(runs)) == 2]
                   + ([edge_rule_table({k: RESULTS / f for k, f in EDGE_RULE_RUNS.items()})]
                      if len(existing(EDGE_RULE_RUNS.values())) == 2 else [])
                   + ([floor_table(existing(FLOOR_RUNS))] if existing(FLOOR_RUNS) else [])
                   + [fixed_cost_table(p) for p in sorted(RESULTS.glob("*fixed_cost_*.json"))]
                   + [gpu_tables(p) for p in sorted(RESULTS.glob("gpu_ops_*.json"), reverse=True)],
    }
    out = ["# Results", "", "Every table is rendered by `python bench/report.py --out docs/RESULTS.md` from the JSON in "
           "`bench/results/` (device, commit, date and command inside each); nothing here is typed by hand.", ""]
    for title, blocks in sections.items():
        if blocks:
            out += [f"## {title}", ""] + [b + "\n" for b in blocks]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the whole results page here (e.g. docs/RESULTS.md) instead of stdout")
    ap.add_argument("--summary", action="store_true", help="only the README's end-to-end summary")
    a = ap.parse_args(argv)
    text = "\n\n".join(engine_summary(p) for p in engine_files()) if a.summary else page()
    if a.out:
        Path(a.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
