"""Base GEMV variants on the GPU: which of the kernel's knobs pay, checked and timed in one run.

    DECDEC_COMMIT=<sha> python bench/gemv_variants.py --out $OUT/gemv_variants.json [--sass] [--quick]

Each variant (rows per warp, K warps, K split, persistent blocks that stream several row tiles, the first
weights loaded before or after the staging) is first checked against the float32 dequantized reference on the
GPU, then timed per launch inside a CUDA graph with the weights rotated through copies larger than 3x L2, next
to torch's int4 tinygemm and an HBM read in the same run (`ops.timing.bandwidth`'s kernel, as bench/gpu_ops.py
measures it). `--sass` also prints the opcode histogram of the default 4-bit kernel and its register /
local-memory use.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

import torch  # noqa: E402
from numba import cuda  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.meta import run_meta  # noqa: E402
from decdec.ops import base_gemv as bg  # noqa: E402
from decdec.ops.timing import Streams, bandwidth, graph_us, random_gemv, random_operands  # noqa: E402

SHAPES = [(28672, 4096), (14336, 4096), (6144, 4096), (4096, 4096), (4096, 14336), (1024, 4096)]


def reference_case(out_f: int, in_f: int, bits: int, gen) -> tuple:
    """(operands, x, float32 reference on the CPU): one per shape, shared by every variant's check."""
    ops = random_operands(out_f, in_f, bits, gen)
    x = torch.randn(in_f, device="cuda", generator=gen).half()
    return ops, x, bg.base_gemv_reference(x.float().cpu(), *(t.cpu() for t in ops), bits)


def check(plan: bg.GemvPlan, case: tuple) -> float:
    """Max |error| / max |reference| of one launch (output poisoned with NaN first)."""
    ops, x, ref = case
    out = torch.full((plan.out_features,), float("nan"), dtype=torch.float16, device="cuda")
    bg.BaseGemv(*ops, plan.bits, plan=plan)(cuda.as_cuda_array(x), cuda.as_cuda_array(out))
    torch.cuda.synchronize()
    return float((out.float().cpu() - ref).abs().max() / ref.abs().max())


def variants(out_f: int, in_f: int, bits: int, n_sm: int, quick: bool, default_only: bool = False
             ) -> dict[str, bg.GemvPlan]:
    p = lambda **kw: bg.plan_gemv(out_f, in_f, bits, n_sm=n_sm, **kw)  # noqa: E731
    v = {"default": p()}
    d = v["default"]
    if default_only:
        return v
    v["R=16"] = p(rows_per_warp=16)
    v["R=32"] = p(rows_per_warp=32)
    for kw in bg.K_WARPS:  # warps splitting a block's K range, rows per warp and K blocks by the cost model
        v[f"k_warps={kw}"] = p(k_warps=kw)
    # the first weights loaded before the staging or after it
    v[f"{'late' if d.early_load else 'early'} first load"] = p(
        rows_per_warp=d.rows_per_warp, k_warps=d.k_warps, k_blocks=d.k_blocks, early_load=not d.early_load)
    if not quick:
        v["one tile per block"] = p(persistent=False)
        for kb in {max(1, d.k_blocks // 2), d.k_blocks * 2, d.k_blocks + 1, max(1, d.k_blocks - 1)}:
            if kb != d.k_blocks:
                v[f"k_blocks={kb}"] = p(k_blocks=kb)
    unique: dict[str, bg.GemvPlan] = {}
    for name, plan in v.items():  # the same plan under two names is timed once
        if plan not in unique.values():
            unique[name] = plan
    return unique


def torch_int4_us(out_f: int, in_f: int, n: int, reps: int, streams: Streams, gen) -> float | None:
    try:
        packed = [torch._convert_weight_to_int4pack(
            torch.randint(0, 256, (out_f, in_f // 2), dtype=torch.uint8, device="cuda", generator=gen), 8)
            for _ in range(n)]
        sz = (torch.rand(in_f // 128, out_f, 2, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        xq = torch.randn(1, in_f, device="cuda", generator=gen).to(torch.bfloat16)
        return graph_us(lambda i: torch._weight_int4pack_mm(xq, packed[i % n], 128, sz), max(n, 100), reps,
                        streams)["us"]
    except Exception as e:  # private op: record, do not stop
        print(f"torch int4 at {out_f}x{in_f}: {type(e).__name__}: {e}"[:200])
        return None


def sass_histogram(plan: bg.GemvPlan) -> dict:
    gemv = random_gemv(plan.out_features, plan.in_features, plan.bits, torch.Generator("cuda"), plan)
    x = torch.randn(plan.in_features, device="cuda").half()
    out = torch.empty(plan.out_features, dtype=torch.float16, device="cuda")
    gemv(cuda.as_cuda_array(x), cuda.as_cuda_array(out))
    torch.cuda.synchronize()
    k = gemv.kernel
    info = {}
    try:
        info = {"regs": str(k.get_regs_per_thread()), "local_bytes": str(k.get_local_mem_per_thread())}
        sass = k.inspect_sass()
        sass = sass if isinstance(sass, str) else "\n".join(sass.values())
        ops = collections.Counter(line.split()[1].split(".")[0] for line in sass.splitlines()
                                  if line.strip().startswith("/*") and len(line.split()) > 2
                                  and line.split()[1][0].isupper())
        info["opcodes"] = dict(ops.most_common(30))
        info["instructions"] = sum(ops.values())
    except Exception as e:
        info["sass_error"] = f"{type(e).__name__}: {e}"[:300]
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="only the default, 16 / 32 rows per warp and 1 / 2 / 4 / 8 K warps")
    ap.add_argument("--default-only", action="store_true", help="only the default plan of each shape")
    ap.add_argument("--bits", default="4,3", help="comma list of weight widths")
    ap.add_argument("--only", help="comma list of variant names to time (e.g. 'default,R=16')")
    ap.add_argument("--sass", action="store_true", help="opcode histogram of the default 4-bit kernel")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", help="comma list OUTxIN (default: Llama-3-8B's six)")
    ap.add_argument("--launch-only", metavar="OUTxINxBITS",
                    help="only launch the default plan of one shape 5 times (a target for ncu)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gemv_variants.py needs a CUDA GPU", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    n_sm, l2 = props.multi_processor_count, props.L2_cache_size
    if args.launch_only:
        out_f, in_f, bits = map(int, args.launch_only.split("x"))
        gemv = random_gemv(out_f, in_f, bits, torch.Generator("cuda"), bg.plan_gemv(out_f, in_f, bits, n_sm=n_sm))
        x = cuda.as_cuda_array(torch.randn(in_f, device="cuda").half())
        out = cuda.as_cuda_array(torch.empty(out_f, dtype=torch.float16, device="cuda"))
        for _ in range(5):
            gemv(x, out)
        torch.cuda.synchronize()
        return 0
    streams = Streams.make(())
    gen = torch.Generator(device="cuda").manual_seed(0)
    hbm = bandwidth(args.reps, zero_copy_mib=())["hbm_read_GBps"]  # as bench/gpu_ops.py measures it
    report = {"meta": run_meta(), "device": props.name, "hbm_read_GBps": hbm, "rows": []}
    print(f"{props.name}: HBM read {report['hbm_read_GBps']:.0f} GB/s")
    if args.sass:
        report["sass"] = sass_histogram(bg.plan_gemv(28672, 4096, 4, n_sm=n_sm))  # the default 4-bit kernel
        print(json.dumps(report["sass"]))
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(map(int, t.split("x"))) for t in args.shapes.split(",")]
    print(f"{'out':>6} {'in':>6} {'b':>2} {'variant':<30} {'R':>2} {'kw':>2} {'kb':>3} {'tpb':>3} {'us':>7} {'GB/s':>6} "
          f"{'HBM':>5} {'err':>8}")
    for out_f, in_f in shapes:
        for bits in map(int, args.bits.split(",")):
            ref_plan = bg.plan_gemv(out_f, in_f, bits, n_sm=n_sm)
            n = max(2, min(64, math.ceil(3 * l2 / ref_plan.weight_bytes)))
            x = cuda.as_cuda_array(torch.randn(in_f, device="cuda", generator=gen).half())
            out = cuda.as_cuda_array(torch.empty(out_f, dtype=torch.float16, device="cuda"))
            weights = [random_operands(out_f, in_f, bits, gen) for _ in range(n)]
            case = reference_case(out_f, in_f, bits, gen)
            for name, plan in variants(out_f, in_f, bits, n_sm, args.quick, args.default_only).items():
                if args.only and name not in args.only.split(","):
                    continue
                err = check(plan, case)
                gemvs = [bg.BaseGemv(*w, bits, plan=plan) for w in weights]
                us = graph_us(lambda i: gemvs[i % n](x, out, stream=streams.main_n), max(n, 100), args.reps,
                              streams)["us"]
                moved = plan.weight_bytes + 4 * out_f * -(-in_f // 128)
                row = {"out": out_f, "in": in_f, "bits": bits, "variant": name, "k_blocks": plan.k_blocks,
                       "tiles_per_block": plan.tiles_per_block, "rows_per_warp": plan.rows_per_warp,
                       "k_warps": plan.k_warps, "early_load": plan.early_load,
                       "us": us, "rel_err": err,
                       "GBps": moved / us / 1e3, "frac_hbm_read": moved / us / 1e3 / report["hbm_read_GBps"]}
                report["rows"].append(row)
                print(f"{out_f:>6} {in_f:>6} {bits:>2} {name:<30} {plan.rows_per_warp:>2} {plan.k_warps:>2} "
                      f"{plan.k_blocks:>3} {plan.tiles_per_block:>3} "
                      f"{us:>7.1f} {row['GBps']:>6.0f} {row['frac_hbm_read']:>5.0%} {err:>8.1e}", flush=True)
            if bits == 4:
                t = torch_int4_us(out_f, in_f, n, args.reps, streams, gen)
                if t is not None:
                    report["rows"].append({"out": out_f, "in": in_f, "bits": 4, "variant": "torch int4", "us": t})
                    print(f"{out_f:>6} {in_f:>6} {4:>2} {'torch _weight_int4pack_mm':<30} {'':>3} {'':>3} {t:>7.1f}")
            del weights
            torch.cuda.empty_cache()
            Path(args.out).write_text(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
