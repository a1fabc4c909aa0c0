"""Where a short GEMV's compensation cost comes from: a GEMV beside a correction, with the GEMV's
persistent grid sized for all of the GPU's SMs (the default plan) or for those the correction's
blocks leave it (`BaseGemv.beside`); the correction alone; each kernel's registers and shared memory.

    python bench/pair_slots.py [--shapes 6144x4096,4096x4096,...] [--k-chunks 1,8] [--n-tbs 4,16]
        --out bench/results/pair_slots_<gpu>.json

Per shape (3-bit, weights and residual tables rotated past L2, CUDA graphs as `ops.timing` times them):
  base                 the GEMV alone (default plan)
  pair                 GEMV + correction (k_chunk, n_tb) on the priority side stream, merged; the GEMV
                       with its default plan, or `beside` the correction (as the executor runs it)
  corr alone           the correction stand-alone (no GEMV beside it)
A correction block (512 threads x 128 registers) fills an SM's register file: the default persistent
grid then needs a second wave for the GEMV blocks it displaces (`BaseGemv.beside`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.meta import run_meta  # noqa: E402
from decdec.ops import base_gemv, timing  # noqa: E402


def kernel_facts(dispatcher) -> dict:
    """Registers per thread and static shared memory of a compiled Numba kernel (its one overload)."""
    k = next(iter(dispatcher.overloads.values()))
    return {"regs_per_thread": k.regs_per_thread, "shared_mem_per_block": k.shared_mem_per_block,
            "max_threads_per_block": k.max_threads_per_block}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="6144x4096,4096x4096,4096x14336,28672x4096,1536x640,640x2048")
    ap.add_argument("--k-chunks", default="1,8")
    ap.add_argument("--n-tbs", default="2,4,16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from decdec.ops import correction

    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    l2 = timing.device_info()["l2_bytes"]
    streams = timing.Streams.make((timing.SIDE_PRIORITY,))
    rng, gen = np.random.default_rng(0), torch.Generator(device="cuda").manual_seed(0)
    result = {**run_meta(), "n_sm": n_sm, "slots": n_sm * base_gemv.MMA_MIN_BLOCKS, "rows": [], "kernels": {}}
    for shape in a.shapes.split(","):
        out_f, in_f = map(int, shape.split("x"))
        s = timing.CorrectionSetup(rng, out_f, in_f, l2)
        g = timing.GemvSetup(out_f, in_f, 3, gen, l2)
        default = g.gemvs[0].plan
        base = timing.graph_us(lambda i: g(i, s.xs[i % timing.N_ACTIVATIONS], streams.main_n), 64, a.reps, streams)
        print(f"{shape}: base {base['us']:.1f} µs, plan {default}", flush=True)
        result["rows"].append({"shape": shape, "what": "base", "us": base["us"], "grid": list(default.grid)})
        for k in map(int, a.k_chunks.split(",")):
            for n_tb in map(int, a.n_tbs.split(",")):
                corrs = s.corrections(k, n_tb, g.tile_rows)
                blocks = corrs[0].plan.blocks
                alone = timing.graph_us(
                    lambda i: corrs[i % len(corrs)](s.xs[i % timing.N_ACTIVATIONS], s.act, base_out=s.base,
                                                    out=s.out, stream=streams.main_n), 64, a.reps, streams)
                result["rows"].append({"shape": shape, "what": "corr alone", "k_chunk": k, "n_tb": blocks,
                                       "us": alone["us"]})
                line = [f"  k {k} blocks {blocks} x {corrs[0].parts} parts: alone {alone['us']:.1f}"]
                for plan_name, gemvs in (("default", g.gemvs), ("beside", g.beside(corrs[0]))):
                    split = g.split_for(corrs[0], gemvs)

                    def step(i, gemvs=gemvs, split=split):
                        x = s.xs[i % timing.N_ACTIVATIONS]
                        streams.fork(lambda st: g(i, x, st, merge=split, gemvs=gemvs),
                                     lambda st: corrs[i % len(corrs)](x, s.act, out=g.out, merge=split, stream=st))

                    t = timing.graph_us(step, max(64, len(gemvs)), a.reps, streams)
                    result["rows"].append({"shape": shape, "what": "pair", "gemv_plan": plan_name, "k_chunk": k,
                                           "n_tb": blocks, "parts": corrs[0].parts, "grid": list(gemvs[0].plan.grid),
                                           "us": t["us"]})
                    line.append(f"{plan_name} (grid {gemvs[0].plan.grid[0]}x{gemvs[0].plan.grid[1]}): {t['us']:.1f}")
                print(", ".join(line), flush=True)
        # one compiled correction for every shape (its sizes are arguments); each GEMV is specialised
        result["kernels"].setdefault("correction", kernel_facts(correction._correction_kernel(True)))
        result["kernels"][f"gemv {shape}"] = kernel_facts(g.gemvs[0].kernel)
        s.close()
        del g
        torch.cuda.empty_cache()
        Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["kernels"], indent=1))


if __name__ == "__main__":
    main()
