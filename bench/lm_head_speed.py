"""The lm_head alone on the GPU: our int8 kernel (`quant.lm_head_bits: 8`) beside torch's fp16 and bf16
matmuls (what our fp16 lm_head and the anchor's bf16 one run), in one run.

    DECDEC_COMMIT=<sha> python bench/lm_head_speed.py [--shapes 128256x4096,262144x640,49152x576]
        [--reps 50] --out FILE.json

Per shape (vocab x dim): random weights, rotated through enough copies that every replay streams from
HBM (`ops.timing.copies_for`), each system captured into one CUDA graph (one launch per copy) and
timed by CUDA events (`ops.timing.graph_us`: µs per launch). Before timing, the int8 kernel's logits
are checked against the dequantized weight's product on the GPU (max |diff| / max |logit| in the row).
`frac_hbm`: the weights' bytes (int8: codes + a float32 scale per row) over the HBM read rate measured
in the same run. Nothing in the product imports this file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.meta import run_meta  # noqa: E402
from decdec.ops import timing  # noqa: E402
from decdec.ops.lm_head import Int8LmHead, dequantize_rows, quantize_rows_int8  # noqa: E402


def shape_rows(vocab: int, dim: int, reps: int, streams: timing.Streams, hbm_GBps: float) -> list[dict]:
    from numba import cuda

    gen = torch.Generator(device="cuda").manual_seed(vocab + dim)
    l2 = timing.device_info()["l2_bytes"]
    h = torch.randn(dim, device="cuda", generator=gen).half()
    # as many copies as the int8 codes need to stream from HBM (the fp16 copies, twice their size, then do too)
    weights = [torch.randn(vocab, dim, device="cuda", generator=gen).half()
               for _ in range(timing.copies_for(vocab * dim, l2))]
    int8 = [quantize_rows_int8(w) for w in weights]
    logits = torch.empty(vocab, device="cuda")
    view = lambda t: cuda.as_cuda_array(t, sync=False)  # noqa: E731
    kernels = [Int8LmHead(view(q), view(s), view(h), view(logits)) for q, s in int8]
    kernels[0](streams.main_n)
    torch.cuda.synchronize()
    want = dequantize_rows(*int8[0]) @ h.float()
    err = ((logits - want).abs().max() / want.abs().max()).item()
    del want
    h_bf16, weights_bf16 = h.bfloat16()[None], [w.bfloat16() for w in weights]
    systems = {
        "ours-int8": (lambda i: kernels[i](streams.main_n), vocab * (dim + 4)),
        "torch-fp16": (lambda i: F.linear(h[None], weights[i]), vocab * dim * 2),
        "torch-bf16": (lambda i: F.linear(h_bf16, weights_bf16[i]), vocab * dim * 2),
    }
    rows = []
    for system, (step, nbytes) in systems.items():
        t = timing.graph_us(step, len(weights), reps, streams)
        rows.append({"shape": [vocab, dim], "system": system, **t, "bytes": nbytes,
                     "frac_hbm": nbytes / (hbm_GBps * 1e3) / t["us"]})
        if system == "ours-int8":
            rows[-1]["max_rel_err"] = err
        print(f"{vocab}x{dim} {system:<11} {t['us']:8.1f} µs  {rows[-1]['frac_hbm']:.0%} of HBM"
              + (f"  (max rel err {err:.1e})" if system == "ours-int8" else ""), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="128256x4096,262144x640,49152x576")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    hbm = timing.bandwidth(10, zero_copy_mib=())["hbm_read_GBps"]
    result = {**run_meta(), **timing.device_info(), "hbm_read_GBps": hbm, "rows": []}
    streams = timing.Streams.make(())
    for shape in a.shapes.split(","):
        vocab, dim = map(int, shape.split("x"))
        result["rows"] += shape_rows(vocab, dim, a.reps, streams, hbm)
        Path(a.out).write_text(json.dumps(result, indent=1))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
