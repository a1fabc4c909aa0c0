"""SASS of the base GEMV kernel without a GPU: Numba -> PTX -> ptxas (sm_90) -> cuobjdump; opcode counts.

    python bench/sass.py [--bits 4] [--out 28672] [--in 4096] [--rows R] [--sass FILE]

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

from decdec.ops import base_gemv as bg  # noqa: E402

dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
bg.pdl_supported = lambda: True  # the kernel as the H100 builds it (asking would need a driver)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", type=int, default=28672)
    ap.add_argument("--in", dest="inp", type=int, default=4096)
    ap.add_argument("--rows", type=int, help="rows per warp (default: the plan's)")
    ap.add_argument("--sass", help="write the full SASS here")
    a = ap.parse_args()
    plan = bg.plan_gemv(a.out, a.inp, a.bits, rows_per_warp=a.rows)
    kernel = bg._mma_kernel(a.bits, plan.rows_per_warp // bg.MMA_ROWS, -(-a.inp // bg.MMA_GROUP),
                            a.out % plan.tile_rows == 0, plan.k_warps, plan.early_load)
    f16, f32 = nt.float16[::1], nt.float32[::1]
    weights = (nt.uint32[::1], nt.uint32[::1])  # BaseGemv.weights: the tiled codes, the (scale, zero) pairs
    sig = nt.void(f16, f32, *weights, f16, f32, nt.int32[::1], nt.int64, nt.int64, nt.int64,
                  nt.boolean, nt.int64, nt.int64)
    bounds = (bg.THREADS, bg.MMA_MIN_BLOCKS)
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
