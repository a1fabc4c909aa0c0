"""Decode speed of the CUDA engine: one captured step per token, base alone vs DecDEC (issue 5).

    DECDEC_COMMIT=<sha> python bench/gpu_engine.py --out $OUT/gpu_engine.json           # ~3-4 min on an H100
    DECDEC_COMMIT=<sha> python bench/gpu_engine.py --only llama --quick --out ...        # smoke run
    (--gemma names the Gemma 3 270M source: the packaged model or a .gguf path; DECDEC_COMMIT names the
    commit where the device copy of the tree has no .git)

Models:
  gemma3-270m    the real model, 3-bit RTN with a small calibration (prepared on the device's CPUs)
  llama3-8b      Llama-3-8B shapes (dim 4096, 32 layers, 32 / 8 heads, ffn 14336, vocab 128256) at 3 bits;
                 random packed weights, residual tables and thresholds made directly (no CPU preparation:
                 timing does not depend on the values); plus torch's fp16 GEMV (torch.mv) in the same
                 executor as the fp16 reference
Each model's weights go to the GPU once (`DeviceModel`); each k_chunk (0 = base alone, then 4, 8, 16)
gets its own plan and captured executor. Per configuration:
  graph_ms      GPU time of one step: CUDA events around `steps` back-to-back replays, position advancing
  tokens_per_s  1000 / graph_ms
  step_ms       median wall time of `executor.run` (fill inputs, replay, logits to the host)
  slowdown      graph_ms over the base model's
Attention reads the whole KV cache (max_seq 256, masked), so steps cost the same at every position.
Nothing in the product imports this file.
"""

from __future__ import annotations

import argparse
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

from bench.meta import run_meta  # noqa: E402
from models.arch import LINEAR_KINDS, ModelArgs  # noqa: E402
from models.graph import build_graph  # noqa: E402
from runtime.executor_cuda import CUDAExecutor, DeviceGroup, DeviceModel, quantized_group  # noqa: E402
from scheduler.plan import MAIN, schedule  # noqa: E402

LLAMA3_8B = dict(family="llama", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                 ffn_dim=14336, norm_eps=1e-5, rope_base=500_000.0, max_seq_len=8192)
K_CHUNKS = (0, 4, 8, 16)
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


def time_model(name: str, model: DeviceModel, layer_bits: list[int], ks, steps: int, kind: str = "quantized") -> list:
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        ex = CUDAExecutor(model, schedule(build_graph(model.args, layer_bits, k)), MAX_SEQ)
        build_s = time.perf_counter() - t0
        r = {"model": name, "weights": kind, "bits": 16 if kind == "fp16" else layer_bits[0], "k_chunk": k,
             **measure(ex, steps), "build_s": build_s}
        base = next((b for b in rows if b["k_chunk"] == 0), None)
        r["slowdown"] = r["graph_ms"] / base["graph_ms"] - 1 if base else 0.0
        rows.append(r)
        print(f"  {name:<12} {kind:<9} k={k:<3} {r['graph_ms']:7.3f} ms/step  {r['tokens_per_s']:7.1f} tok/s  "
              f"step {r['step_ms']:6.3f} ms  {r['slowdown']:+.1%}  (built in {build_s:.1f} s)", flush=True)
        del ex
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------
# models


def gemma(source: str, ks, steps: int) -> list:
    from models.prepare import prepare
    from runtime.config import load_config

    cfg = load_config({"model": {"source": source, "max_seq_len": MAX_SEQ}, "quant": {"method": "rtn", "bits": BITS},
                       "calibration": {"tokens": 256, "ctx": 128}, "artifacts": "/tmp/decdec-bench-gemma"})
    t0 = time.perf_counter()
    prepared = prepare(cfg, progress=False)
    print(f"  gemma3-270m prepared in {time.perf_counter() - t0:.1f} s", flush=True)
    model = DeviceModel.from_prepared(prepared.model.args, prepared.model.weights, prepared.groups)
    try:
        return time_model("gemma3-270m", model, prepared.layer_bits, ks, steps)
    finally:
        model.close()


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


def fp16_groups(args: ModelArgs, gen: torch.Generator) -> dict:
    groups = {}
    for i in range(args.n_layers):
        for kind in LINEAR_KINDS:
            out_f, in_f = args.linear_shape(kind)
            w = torch.randn(out_f, in_f, device="cuda", generator=gen, dtype=torch.float16) / math.sqrt(in_f)
            groups[i, kind] = DeviceGroup((out_f, in_f), None, (), dense=w)
    return groups


def llama(ks, steps: int, fp16: bool) -> list:
    args = ModelArgs(**LLAMA3_8B)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rng = np.random.default_rng(0)
    weights = synthetic_weights(args, gen)
    t0 = time.perf_counter()
    model = DeviceModel(args, weights, random_quantized(args, BITS, gen, rng))
    print(f"  llama3-8b random 3-bit model + {sum(g.table.nbytes for g in model.groups.values()) / 2**30:.2f} GiB "
          f"of pinned residual tables in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        rows = time_model("llama3-8b", model, [BITS] * args.n_layers, ks, steps)
    finally:
        model.close()
        del model
        torch.cuda.empty_cache()
    if fp16:
        dense = DeviceModel(args, weights, fp16_groups(args, gen))
        rows += time_model("llama3-8b", dense, [BITS] * args.n_layers, [0], steps, kind="fp16")
        del dense
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="gemma,llama", help="comma list of: gemma, llama")
    ap.add_argument("--gemma", default="gemma3-270m", help="Gemma 3 270M source: packaged name or .gguf path")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="k_chunk 0 and 8 only, 16 steps, no fp16 reference")
    args = ap.parse_args(argv)
    ks = (0, 8) if args.quick else K_CHUNKS
    steps = 16 if args.quick else args.steps
    meta = run_meta()
    try:
        from importlib.metadata import version

        meta["numba_cuda"] = version("numba-cuda")
    except Exception:  # noqa: BLE001 - provenance only
        meta["numba_cuda"] = None
    result = {**meta, "max_seq": MAX_SEQ, "bits": BITS, "rows": [], "errors": []}
    only = set(args.only.split(","))
    sections = [("gemma", lambda: gemma(args.gemma, ks, steps)), ("llama", lambda: llama(ks, steps, not args.quick))]
    for name, run in sections:
        if name not in only:
            continue
        print(f"{name}:", flush=True)
        try:
            result["rows"] += run()
        except Exception as e:  # noqa: BLE001 - one model failing must not lose the other's numbers
            traceback.print_exc()
            result["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}"[:2000]})
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
