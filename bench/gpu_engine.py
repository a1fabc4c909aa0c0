"""End-to-end decode on the GPU: tokens/s of whole models, base alone and tuned to each target slowdown.

    DECDEC_COMMIT=<sha> python bench/gpu_engine.py --out $OUT/gpu_engine.json [--only llama,smollm,gemma]
        [--gemma PATH] [--quick]
    (--gemma names the Gemma 3 270M source: the packaged model or a .gguf path; DECDEC_COMMIT names the
    commit where the device copy of the tree has no .git)

Models:
  llama3-8b      Llama-3-8B shapes (dim 4096, 32 layers, 32 / 8 heads, ffn 14336, vocab 128256) at 3 bits;
                 random packed weights, residual tables (pinned) and thresholds made directly (timing does
                 not depend on the values)
  smollm2-135m   SmolLM2-135M's shapes the same way (its tuned k_chunk feed the quality table)
  gemma3-270m    the real model, 3-bit RTN with a small calibration (prepared on the device's CPUs)
For each model, in one run:
  1. the base step (k_chunk 0), captured: graph_ms = CUDA events around `steps` back-to-back replays
     (position advancing), tokens_per_s = 1000 / graph_ms, step_ms = median wall time of `run`
     (inputs in, replay, logits to the host);
  2. `decdec tune`'s measurement of this GPU on the model's own linear shapes (runtime/tune.py);
  3. per target slowdown: the tuner's choice (k_chunk, n_tb per group shape) and predicted step, then
     that plan captured and measured like the base: slowdown = graph_ms / base graph_ms - 1;
  4. the same shapes with torch's fp16 GEMV and torch's int4 kernel in place of ours (random weights,
     same executor), and the roofline: weight + lm_head bytes per step / the HBM read rate measured
     in step 2, over the step time.
Attention reads the whole KV cache (max_seq 256, masked), so steps cost the same at every position.
Nothing in the product imports this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")  # the correction's few blocks are the point

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baselines import fp16_matvec, torch_int4_matvec  # noqa: E402
from bench.meta import run_meta  # noqa: E402
from decdec.models.arch import LINEAR_KINDS, ModelArgs  # noqa: E402
from decdec.models.graph import build_graph, group_shapes  # noqa: E402
from decdec.errors import ConfigError  # noqa: E402
from decdec.runtime.executor_cuda import CUDAExecutor, DeviceGroup, DeviceModel, quantized_group  # noqa: E402
from decdec.runtime.tune import measure_profile  # noqa: E402
from decdec.scheduler.latency import weight_bytes  # noqa: E402
from decdec.scheduler.plan import MAIN, schedule  # noqa: E402
from decdec.scheduler.tuner import tune_measured  # noqa: E402

LLAMA3_8B = dict(family="llama", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                 ffn_dim=14336, norm_eps=1e-5, rope_base=500_000.0, max_seq_len=8192)
SMOLLM2_135M = dict(family="llama", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                    ffn_dim=1536, norm_eps=1e-5, rope_base=100_000.0, max_seq_len=8192)
TARGETS = (0.025, 0.05, 0.10, 0.20)
MAX_SEQ = 256
BITS = 3


def measure(ex: CUDAExecutor, steps: int, warmup: int = 3) -> dict:
    for p in range(warmup):
        ex.run(1, p)
    main = ex.streams[MAIN]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record(main)
    for p in range(steps):
        ex.replay_only(p)
    end.record(main)
    end.synchronize()
    graph_ms = start.elapsed_time(end) / steps
    wall = []
    for p in range(steps):
        t = time.perf_counter()
        ex.run(1, p)
        wall.append(time.perf_counter() - t)
    return {"graph_ms": graph_ms, "tokens_per_s": 1e3 / graph_ms, "step_ms": statistics.median(wall) * 1e3,
            "steps": steps}


def step_bytes(args: ModelArgs, weights: str) -> int:
    """Bytes a step must read from HBM at least: every linear group's weights (packed codes with fp16
    scale and zero per group of 128; fp16 for 'fp16'; int4 for 'torch int4') and the fp16 lm_head."""
    total = 2 * args.vocab_size * args.dim
    for kind in LINEAR_KINDS:
        out, inp = args.linear_shape(kind)
        total += args.n_layers * (2 * out * inp if weights == "fp16" else
                                  weight_bytes(out, inp, 4 if weights == "torch int4" else BITS))
    return int(total)


def report(name: str, weights: str, r: dict, hbm_GBps: float | None, args: ModelArgs, **extra) -> dict:
    row = {"model": name, "weights": weights, **extra, **r, "bytes_per_step": step_bytes(args, weights)}
    if hbm_GBps:
        row["frac_roofline"] = row["bytes_per_step"] / (hbm_GBps * 1e6) / row["graph_ms"]
    print(f"  {name:<13} {weights:<10} {str(extra.get('target', '')):<6} {r['graph_ms']:7.3f} ms/step "
          f"{r['tokens_per_s']:7.1f} tok/s  step {r['step_ms']:6.3f} ms  {extra.get('slowdown', 0):+.1%}"
          + (f"  predicted {extra['predicted_ms']:.3f} ms" if "predicted_ms" in extra else ""), flush=True)
    return row


def tuned_rows(name: str, model: DeviceModel, layer_bits: list[int], steps: int, targets, quick: bool,
               out: dict, save) -> None:
    """Base step, this GPU's profile on the model's shapes, and per target the plan that
    `scheduler.tuner.tune_measured` accepts (tuned, captured, measured; retuned while over the target).
    Rows go into out["rows"], and save() runs after each (partial results survive a cut-off run)."""
    args = model.args
    shapes = group_shapes(args, layer_bits)
    base_ex = CUDAExecutor(model, schedule(build_graph(args, layer_bits, 0)), MAX_SEQ)
    base = measure(base_ex, steps)
    t0 = time.perf_counter()
    profile = measure_profile(shapes, quick=quick, progress=False)
    print(f"  {name}: measured {len(shapes)} group shapes in {time.perf_counter() - t0:.0f} s "
          f"(HBM read {profile.hbm_read_GBps:.0f} GB/s, zero-copy {profile.zero_copy_GBps:.1f} GB/s)", flush=True)
    hbm = out["hbm_read_GBps"] = profile.hbm_read_GBps
    out["profile"] = dataclasses.asdict(profile)
    rows = out.setdefault("rows", [])
    rows.append(report(name, "quantized", base, hbm, args, target=0.0, slowdown=0.0))
    save()

    def build(t) -> CUDAExecutor:
        return CUDAExecutor(model, schedule(build_graph(args, layer_bits, t.k_chunks, t.n_tbs)), MAX_SEQ,
                            cache=base_ex.cache)

    for target in targets:
        try:
            t, ex = tune_measured(profile.model, shapes, base["graph_ms"] * 1e3, target, build,
                                  lambda ex: measure(ex, steps)["graph_ms"] * 1e3)
        except ConfigError as e:  # an unreachable target is a result too
            rows.append({"model": name, "weights": "quantized", "target": target, "error": str(e)})
            print(f"  {name:<13} target {target:.1%}: {e}", flush=True)
            save()
            continue
        r = measure(ex, steps)
        choices = {f"{kind}@{bits}": {"k_chunk": c.k_chunk, "n_tb": c.n_tb, "base_us": c.base_us,
                                      "pair_us": c.pair_us} for (kind, bits), c in t.choices.items()}
        rounds = [{"budget": x.budget, "predicted_ms": x.predicted_step_us / 1e3, "measured_ms": x.measured_step_us / 1e3}
                  for x in t.rounds]
        rows.append(report(name, "quantized", r, hbm, args, target=target, slowdown=r["graph_ms"] / base["graph_ms"] - 1,
                           predicted_ms=t.predicted_step_us / 1e3,
                           predicted_error=r["graph_ms"] / (t.predicted_step_us / 1e3) - 1, choices=choices,
                           rounds=rounds))
        save()
        del ex
        torch.cuda.empty_cache()
    again = measure(base_ex, steps)  # drift check: the base once more, after every target
    rows.append(report(name, "quantized", again, hbm, args, target="base again",
                       slowdown=again["graph_ms"] / base["graph_ms"] - 1))
    save()


def baseline_rows(name: str, args: ModelArgs, weights: dict, steps: int, hbm: float, gen) -> list:
    """The same model with torch's fp16 GEMV, then with torch's int4 kernel, in place of ours."""
    rows = []
    for kind, groups_for in (("fp16", fp16_groups), ("torch int4", int4_groups)):
        try:
            model = DeviceModel(args, weights, groups_for(args, gen))
            ex = CUDAExecutor(model, schedule(build_graph(args, [BITS] * args.n_layers, 0)), MAX_SEQ)
            rows.append(report(name, kind, measure(ex, steps), hbm, args))
            del ex, model
        except Exception as e:  # noqa: BLE001 - torch's int4 kernel rejects some widths (576)
            rows.append({"model": name, "weights": kind, "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"  {name:<13} {kind}: {rows[-1]['error'][:200]}", flush=True)
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------
# models


def gemma(source: str, steps: int, targets, quick: bool, baselines: bool, out: dict, save) -> None:
    from decdec.models.prepare import prepare
    from decdec.config import load_config

    cfg = load_config({"model": {"source": source, "max_seq_len": MAX_SEQ}, "quant": {"method": "rtn", "bits": BITS},
                       "calibration": {"tokens": 256, "ctx": 128}, "artifacts": "/tmp/decdec-bench-gemma"})
    t0 = time.perf_counter()
    prepared = prepare(cfg, progress=False)
    print(f"  gemma3-270m prepared in {time.perf_counter() - t0:.1f} s", flush=True)
    args = prepared.model.args
    model = DeviceModel.from_prepared(args, prepared.model.weights, prepared.groups)
    try:
        tuned_rows("gemma3-270m", model, prepared.layer_bits, steps, targets, quick, out, save)
    finally:
        model.close()
    if baselines:
        gen = torch.Generator(device="cuda").manual_seed(0)
        out["rows"] += baseline_rows("gemma3-270m", args, prepared.model.weights, steps, out["hbm_read_GBps"], gen)


def threshold_profile(rng, width: int) -> np.ndarray:
    """A calibrated-looking profile (models/calibrate.py): largest r-th |x| over 16 heavy-tailed samples."""
    return np.sort(np.abs(rng.standard_t(df=3, size=(16, width))), axis=-1)[:, ::-1].max(axis=0).astype(np.float32)


def synthetic_weights(args: ModelArgs, gen: torch.Generator) -> dict:
    weights = {"embed": torch.randn(args.vocab_size, args.dim, device="cuda", generator=gen, dtype=torch.float16)}
    weights["lm_head"] = weights["embed"]
    weights["norm"] = torch.ones(args.dim)
    for i in range(args.n_layers):
        weights[f"layers.{i}.attn_norm"] = weights[f"layers.{i}.ffn_norm"] = torch.ones(args.dim)
    return weights


def random_quantized(args: ModelArgs, bits: int, gen: torch.Generator, rng) -> dict:
    """Random 3-bit groups with residual tables in pinned memory (any bit pattern is a valid packing;
    the tables' random bytes are made on the GPU: NumPy's generator takes ~6 s per GB on a CPU core).
    Scales make each output about as large as the input (codes centred on the zero point), so the
    activations stay finite through 32 layers."""
    groups = {}
    for i in range(args.n_layers):
        for kind in LINEAR_KINDS:
            out_f, in_f = args.linear_shape(kind)
            n_groups = -(-in_f // 128)
            qweight = torch.randint(-2**31, 2**31, (out_f, in_f * bits // 32), dtype=torch.int32, device="cuda",
                                    generator=gen)
            scales = torch.full((out_f, n_groups), 1 / (2.3 * math.sqrt(in_f)), dtype=torch.float16, device="cuda")
            zeros = torch.full((out_f, n_groups), 2 ** (bits - 1), dtype=torch.float16, device="cuda")
            rows = torch.randint(0, 256, (in_f, -(-out_f // 2)), dtype=torch.uint8, device="cuda", generator=gen)
            groups[i, kind] = quantized_group(qweight, scales, zeros, torch.ones(in_f), bits, rows=rows,
                                              rscale=torch.full((out_f,), 1e-3),
                                              thresholds=threshold_profile(rng, in_f))
    return groups


def torch_groups(args: ModelArgs, matvec_for) -> dict:
    """Every linear group as a torch baseline: matvec_for(out, in) -> DeviceGroup.matvec."""
    return {(i, kind): DeviceGroup(args.linear_shape(kind), None, (), matvec=matvec_for(*args.linear_shape(kind)))
            for i in range(args.n_layers) for kind in LINEAR_KINDS}


def fp16_groups(args: ModelArgs, gen: torch.Generator) -> dict:
    """Random fp16 weights through torch.mv."""
    return torch_groups(args, lambda out_f, in_f: fp16_matvec(
        torch.randn(out_f, in_f, device="cuda", generator=gen, dtype=torch.float16) / math.sqrt(in_f)))


def int4_groups(args: ModelArgs, gen: torch.Generator) -> dict:
    """Random int4 weights in torch's tinygemm layout, group 128 (scales small enough to stay finite)."""

    def matvec_for(out_f: int, in_f: int):
        codes = torch.randint(0, 256, (out_f, in_f // 2), dtype=torch.uint8, device="cuda", generator=gen)
        sz = torch.zeros(-(-in_f // 128), out_f, 2, device="cuda")
        sz[..., 0] = 1 / (4.6 * math.sqrt(in_f))
        return torch_int4_matvec(codes, sz)

    return torch_groups(args, matvec_for)


def synthetic(name: str, spec: dict, steps: int, targets, quick: bool, baselines: bool, out: dict, save) -> None:
    """A random 3-bit model of real shapes with pinned residual tables; then the torch baselines."""
    args = ModelArgs(**spec)
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = synthetic_weights(args, gen)
    t0 = time.perf_counter()
    model = DeviceModel(args, weights, random_quantized(args, BITS, gen, np.random.default_rng(0)))
    print(f"  {name} random 3-bit model + {sum(g.table.nbytes for g in model.groups.values()) / 2**30:.2f} GiB "
          f"of pinned residual tables in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        tuned_rows(name, model, [BITS] * args.n_layers, steps, targets, quick, out, save)
    finally:
        model.close()
        del model
        torch.cuda.empty_cache()
    if baselines:
        out["rows"] += baseline_rows(name, args, weights, steps, out["hbm_read_GBps"], gen)


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="llama,smollm,gemma", help="comma list of: llama, smollm, gemma")
    ap.add_argument("--gemma", default="gemma3-270m", help="Gemma 3 270M source: packaged name or .gguf path")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--targets", default=",".join(str(t) for t in TARGETS), help="comma list of target slowdowns")
    ap.add_argument("--quick", action="store_true", help="quick profile grid, 16 steps")
    ap.add_argument("--no-baselines", action="store_true", help="skip the fp16 and torch int4 models")
    args = ap.parse_args(argv)
    targets = [float(t) for t in args.targets.split(",")]
    steps = 16 if args.quick else args.steps
    meta = run_meta()
    try:
        from importlib.metadata import version

        meta["numba_cuda"] = version("numba-cuda")
    except Exception:  # noqa: BLE001 - provenance only
        meta["numba_cuda"] = None
    result = {**meta, "max_seq": MAX_SEQ, "bits": BITS, "targets": targets, "steps": steps, "models": {},
              "errors": []}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out_path.write_text(json.dumps(result, indent=1, default=str))

    base_line = not args.no_baselines
    sections = {
        "llama": ("llama3-8b", lambda out: synthetic("llama3-8b", LLAMA3_8B, steps, targets, args.quick, base_line, out, save)),
        "smollm": ("smollm2-135m", lambda out: synthetic("smollm2-135m", SMOLLM2_135M, steps, targets, args.quick,
                                                         base_line, out, save)),
        "gemma": ("gemma3-270m", lambda out: gemma(args.gemma, steps, targets, args.quick, base_line, out, save)),
    }
    for key in args.only.split(","):
        name, run = sections[key]
        print(f"{name}:", flush=True)
        try:
            run(result["models"].setdefault(name, {}))
        except Exception as e:  # noqa: BLE001 - one model failing must not lose the others' numbers
            traceback.print_exc()
            result["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}"[:2000]})
        save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
