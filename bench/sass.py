"""SASS of our kernels without a GPU: Numba -> PTX -> ptxas (sm_90) -> cuobjdump; opcode counts.

    python bench/sass.py [--kernel gemv] [--bits 4] [--out 28672] [--in 4096] [--rows R]
        [--prologue fp16] [--residual] [--sass FILE]
    python bench/sass.py --kernel correction [--prologue P] [--stand-alone]
    python bench/sass.py --kernel attention [--model gemma3-270m] [--splits S]
    python bench/sass.py --kernel lm_head [--in 4096]

Each kernel is built as its launch site builds it (`BaseGemv.__call__`, `Correction.__call__`,
`DecodeAttention`), so a kernel that would not compile on the GPU fails here first, for the price of
no device time.

Needs what the GPU image has but this machine does not, from pip wheels:
numba-cuda 0.30.4 with nvidia-cuda-nvrtc-cu12 in a venv, and `ptxas` (nvidia-cuda-nvcc-cu12),
`cuobjdump` + `nvdisasm` (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm) on PATH. Numba asks the
(absent) driver for the compute capability when it compiles device functions, so that one call is
answered with (9, 0), and the kernel is built with programmatic dependent launch, as on Hopper.
The counts matched the H100's own `inspect_sass` within 1 %. Prints ptxas's register / spill line,
the whole kernel's opcode histogram, and that of its largest FFMA / HMMA block (the step body).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numba.cuda.dispatcher as dispatcher  # noqa: E402
from numba import cuda  # noqa: E402
from numba import types as nt  # noqa: E402

from bench.attention_tiles import SHAPES as ATTENTION_SHAPES, model_args  # noqa: E402
from decdec.ops import attention as at  # noqa: E402
from decdec.ops import base_gemv as bg  # noqa: E402
from decdec.ops import correction as corr  # noqa: E402
from decdec.ops import lm_head  # noqa: E402

dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
for module in (bg, corr, at, lm_head):
    module.pdl_supported = lambda: True  # the kernels as the H100 builds them (asking would need a driver)
f16, f32, i32, u32 = nt.float16[::1], nt.float32[::1], nt.int32[::1], nt.uint32[::1]


def instructions(sass: str) -> list[str]:
    """Opcodes in program order (predicates and modifiers stripped)."""
    ops = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(.*?);", line)
        if m:
            ops.append(re.sub(r"^@!?U?P\w+\s+", "", m.group(1)).split()[0].split(".")[0])
    return ops


def step_body(ops: list[str]) -> list[str]:
    """The run between branches with the most FFMA / HMMA: the unrolled step."""
    runs, cur = [], []
    for op in ops:
        if op in ("BRA", "BAR", "EXIT"):
            runs.append(cur)
            cur = []
        else:
            cur.append(op)
    runs.append(cur)
    return max(runs, key=lambda r: r.count("FFMA") + r.count("HMMA"))


def gemv(a) -> tuple:
    """The base GEMV of one shape, prologue and residual (BaseGemv.__call__'s arguments)."""
    plan = bg.plan_gemv(a.out, a.inp, a.bits, rows_per_warp=a.rows)
    kernel = bg._mma_kernel(a.bits, plan.rows_per_warp // bg.MMA_ROWS, -(-a.inp // bg.MMA_GROUP),
                            a.out % plan.tile_rows == 0, plan.k_warps, plan.early_load, a.prologue, a.residual)
    x = f32 if a.prologue == "rms_norm" else f16
    # x, act_scale, the tiled codes, the (scale, zero) pairs, out, partials, counters, resid, n_out, n_in,
    # groups_per_kblock, direct, n_parts, magic, eps
    sig = nt.void(x, f32, u32, u32, f32 if a.residual else f16, f32, i32, f32, nt.int64, nt.int64, nt.int64,
                  nt.boolean, nt.int64, nt.int64, nt.float32)
    return kernel, sig, (bg.THREADS, bg.MMA_MIN_BLOCKS)


def correction(a) -> tuple:
    """The fused correction, merged (default) or stand-alone, for one prologue (Correction.__call__'s arguments)."""
    kernel = corr._correction_kernel(not a.stand_alone, a.prologue)
    x = f32 if a.prologue == "rms_norm" else f16
    i64, f = nt.int64, nt.float32
    # x, act_scale, rows, rscale, base_out, out, partials, counters, n_parts, a, b, hi_scale, lo_scale, k_chunk,
    # k_last, batch, span, n_out, tile_rows, n_tiles, tiles_per_block, wc_n, ks_n, resid, has_resid, width, eps
    sig = nt.void(x, f32, nt.uint32[:, ::1], f16, f16, f16, f32, i32, i64, f, f, f, f, i64, i64, i64, i64, i64,
                  i64, i64, i64, i64, i64, f32, nt.boolean, i64, f)
    return kernel, sig, (corr.THREADS, 1)


def attention(a) -> tuple:
    """Decode attention of one model's layer shapes at its default plan, or --splits (DecodeAttention's arguments)."""
    plan = at.plan_attention(model_args(a.model), splits=a.splits)
    kernel = at._attention_kernel(plan.group, plan.head_dim, plan.tile, plan.splits)
    f, b, i64 = nt.float32, nt.boolean, nt.int64
    # qkv, bias, has_bias, q_norm, k_norm, has_norm, eps, scale, position, cos, sin, k cache, v cache, out,
    # partial (max, sum), partial acc, counters, n_kv, window
    sig = nt.void(u32, f32, b, f32, f32, b, f, f, nt.int64[::1], f32, f32, u32, u32, u32, f32, f32, i32, i64, i64)
    print(f"attention plan: {plan}")
    return kernel, sig, (at.THREADS, 1)


def int8_lm_head(a) -> tuple:
    """The int8 lm_head for --in inputs (Int8LmHead's arguments: h pairs, codes, scale, out, rows)."""
    sig = nt.void(u32, u32, f32, f32, nt.int64)
    return lm_head._lm_head_kernel(a.inp // lm_head.VECTOR), sig, (lm_head.THREADS, lm_head.BLOCKS_PER_SM)


KERNELS = {"gemv": gemv, "correction": correction, "attention": attention, "lm_head": int8_lm_head}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", choices=KERNELS, default="gemv")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", type=int, default=28672)
    ap.add_argument("--in", dest="inp", type=int, default=4096)
    ap.add_argument("--rows", type=int, help="rows per warp (default: the plan's)")
    ap.add_argument("--prologue", choices=bg.PROLOGUES, default="fp16")
    ap.add_argument("--residual", action="store_true", help="gemv: the residual add folded in")
    ap.add_argument("--stand-alone", action="store_true", help="correction: not merged into a GEMV's split output")
    ap.add_argument("--model", choices=ATTENTION_SHAPES, default="gemma3-270m")
    ap.add_argument("--splits", type=int, help="attention: splits per kv head (default: the plan's)")
    ap.add_argument("--sass", help="write the full SASS here")
    a = ap.parse_args()
    kernel, sig, bounds = KERNELS[a.kernel](a)
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0), launch_bounds=bounds)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        r = subprocess.run(["ptxas", "-arch=sm_90", "-v", f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"],
                           capture_output=True, text=True, check=True)
        print(*(line.strip() for line in r.stderr.splitlines() if "registers" in line or "spill" in line), sep="\n")
        if shutil.which("cuobjdump") is None:
            print("(no cuobjdump on PATH: the opcode counts need it)")
            return
        sass = subprocess.run(["cuobjdump", "-sass", f"{tmp}/k.cubin"], capture_output=True, text=True,
                              check=True).stdout
    if a.sass:
        Path(a.sass).write_text(sass)
    ops = instructions(sass)
    body = step_body(ops)
    print(f"kernel: {len(ops)} instructions", dict(collections.Counter(ops).most_common(12)))
    print(f"step body: {len(body)} instructions", dict(collections.Counter(body).most_common(12)))


if __name__ == "__main__":
    main()
