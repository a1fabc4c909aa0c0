"""Decode attention on the GPU: the kernel's tile (positions a block takes at once) and split count timed
per launch at KV positions 256, 2048 and 8192 (max_seq 8192), each plan first checked against the CPU
reference at position 255.

    DECDEC_COMMIT=<sha> python bench/attention_tiles.py --out $OUT/attention_tiles.json

Launches rotate over 4 layers' caches (more than L2 at long context), captured in a CUDA graph
(`ops.timing.graph_us`, per launch). Nothing in the product imports this file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from numba import cuda

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.meta import run_meta  # noqa: E402
from decdec.models.arch import KVCache, ModelArgs  # noqa: E402
from decdec.ops.attention import (AttentionScratch, DecodeAttention, decode_attention_reference,  # noqa: E402
                                  plan_attention, rope_table)
from decdec.ops.timing import Streams, graph_us  # noqa: E402

MAX_SEQ, LAYERS = 8192, 4
POSITIONS = (255, 2047, 8191)
SHAPES = {  # (heads, kv heads, head_dim, family extras); Gemma's layers as its global ones (no window)
    "llama3-8b": (32, 8, 128, {}),
    "gemma3-270m": (4, 1, 256, dict(rope_local_base=1e4, sliding_window=512, sliding_pattern=1, query_scale=0.0625)),
    "smollm2-135m": (9, 3, 64, {}),
}


def model_args(name: str) -> ModelArgs:
    heads, kv, hd, extra = SHAPES[name]
    return ModelArgs("gemma3" if extra else "llama", vocab_size=8, dim=8, n_layers=LAYERS, n_heads=heads,
                     n_kv_heads=kv, head_dim=hd, ffn_dim=8, norm_eps=1e-6, rope_base=1e4, **extra)


def layer_setup(args: ModelArgs, gen: torch.Generator):
    """fp16 caches of every layer, rope tables, norm weights, qkv and position buffers on the GPU."""
    shape = (args.n_layers, MAX_SEQ, args.n_kv_heads, args.head_dim)
    cache = KVCache(*(torch.randn(shape, generator=gen, device="cuda").half() for _ in range(2)))
    weights = {}
    if args.is_gemma:
        for layer in range(args.n_layers):
            for n in ("q_norm", "k_norm"):
                weights[f"layers.{layer}.{n}"] = torch.rand(args.head_dim, generator=gen, device="cuda") + 0.5
    qkv = (torch.randn(args.q_dim + 2 * args.kv_dim, generator=gen, device="cuda") * 2).half()
    return cache, weights, qkv, torch.zeros(1, dtype=torch.int64, device="cuda")


def launches(args, plan, cache, weights, qkv, position, out):
    scratch = AttentionScratch.allocate(plan)
    a = cuda.as_cuda_array
    result = []
    for layer in range(args.n_layers):
        rope = tuple(a(t.cuda()) for t in rope_table(args.head_dim, args.rope_base_of(layer), MAX_SEQ))
        norms = {n: a(weights[f"layers.{layer}.{n}"]) for n in ("q_norm", "k_norm") if args.is_gemma}
        result.append(DecodeAttention(args, layer, plan, scratch, a(qkv), a(position), a(cache.k), a(cache.v),
                                      a(out), rope, **norms))
    return result


def check(args, attn, cache, weights, qkv, position, out, layer: int = LAYERS - 1) -> float:
    """Max |error| / max |reference| at position 255 of one layer (output poisoned first)."""
    position.fill_(255)
    before = KVCache(cache.k[layer:layer + 1].cpu(), cache.v[layer:layer + 1].cpu())
    w = {k.replace(f"layers.{layer}.", "layers.0."): v.cpu() for k, v in weights.items() if f"layers.{layer}." in k}
    one = ModelArgs(**{**args.__dict__, "n_layers": 1})
    want = decode_attention_reference(one, w, 0, qkv.cpu(), position.cpu(), before).float()
    out.fill_(float("nan"))
    attn[layer]()
    torch.cuda.synchronize()
    return float((out.float().cpu() - want).abs().max() / want.abs().max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tiles", type=lambda v: [int(x) for x in v.split(",")], default=[0],
                    help="tiles to time, comma list (0: the default plan's and half of it)")
    ap.add_argument("--splits", type=lambda v: [int(x) for x in v.split(",")], default=[64, 128, 256],
                    help="split counts to time beside the default plan's, comma list")
    args_ = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/attention_tiles.py needs a CUDA GPU", file=sys.stderr)
        return 2
    report = {"meta": run_meta(), "device": torch.cuda.get_device_name(), "rows": []}
    streams = Streams.make(())
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{report['device']}\n{'model':<14} {'tile':>4} {'splits':>6} {'err':>8} " +
          " ".join(f"{'pos ' + str(p + 1):>9}" for p in POSITIONS) + "  (us per launch)")
    for name in args_.models.split(","):
        args = model_args(name)
        cache, weights, qkv, position = layer_setup(args, gen)
        out = torch.empty(args.q_dim, dtype=torch.float16, device="cuda")
        default = plan_attention(args)
        for tile in sorted({x for t in args_.tiles for x in ((default.tile // 2, default.tile) if t == 0 else (t,))}):
            for splits in sorted({default.splits, *(s for s in args_.splits if s)}):
                try:
                    plan = plan_attention(args, tile, splits)
                except ValueError:  # a tile or split count the kernel cannot take at this head size
                    continue
                attn = launches(args, plan, cache, weights, qkv, position, out)
                err = check(args, attn, cache, weights, qkv, position, out)
                row = {"model": name, "tile": tile, "splits": splits, "default": plan == default, "rel_err": err,
                       "us": {}}
                with torch.cuda.stream(streams.main):
                    for pos in POSITIONS:
                        position.fill_(pos)
                        torch.cuda.synchronize()
                        row["us"][pos + 1] = graph_us(lambda i: attn[i % LAYERS](streams.main_n), 2 * LAYERS,
                                                      args_.reps, streams)["us"]
                report["rows"].append(row)
                print(f"{name:<14} {tile:>4} {splits:>6} {err:>8.1e} " +
                      " ".join(f"{row['us'][p + 1]:>9.2f}" for p in POSITIONS) + ("  default" if row["default"] else ""),
                      flush=True)
        del cache
        torch.cuda.empty_cache()
        Path(args_.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
