"""Where a small correction's time goes: the fused kernel against its parts, on the GPU.

    DECDEC_COMMIT=<sha> python bench/correction_floor.py --out $OUT/correction_floor.json

For each (out, in, k_chunk) it times, in one run (CUDA-graph replays, CUDA events, per launch):
  k0          the same kernel with k_chunk 0: launch, emit, nothing selected or fetched
  hbm         the table in device memory (one copy, L2-resident): selection + fetch without PCIe
  zero1       zero-copy, one table launched over and over (its pages' translations stay warm)
  zeroN       zero-copy, tables rotated past L2 (what bench/gpu_ops.py and the product see)
  huge        zero-copy from transparent-huge-page memory registered by cudaHostRegister, rotated
  zero_many   (--many-gib G) zero-copy rotated over G GiB of tables, as a whole model has; huge_many
              the same in huge pages
  fetch       the plain zero-copy gather (`bench.op_kernels.fetch_rows_cuda`) of the same number of rows, rotated
  select      the stand-alone selector kernel (`bench.op_kernels.select_bucket_cuda`)
and the fused kernel over n_tb. Differences between rows locate the floor: hbm - k0 is selection and
arithmetic, zero1 - hbm the PCIe round trips, zeroN - zero1 the translation of cold host pages.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
from pathlib import Path

os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from numba import cuda  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.meta import run_meta  # noqa: E402
from decdec.ops import correction as co  # noqa: E402
from decdec.ops import dma, selector  # noqa: E402
from bench.op_kernels import fetch_rows_cuda, pcie_bytes, select_bucket_cuda  # noqa: E402
from decdec.ops.timing import CorrectionSetup, Streams, device_info, graph_us  # noqa: E402

MADV_HUGEPAGE = 14
HUGE = 2 << 20


class HugeTable:
    """A residual table in anonymous memory advised to transparent huge pages, then pinned and mapped by
    cudaHostRegister: same rows as a PinnedTable, so the kernels see the same bytes."""

    def __init__(self, src: dma.PinnedTable):
        from cuda.bindings import runtime as rt

        self.stride, self.n_rows = src.stride, src.n_rows
        size = -(-src.nbytes // HUGE) * HUGE
        self.map = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.ptr = -(-base // HUGE) * HUGE  # 2 MiB aligned start
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(self.ptr, size, MADV_HUGEPAGE)  # whether the pages came huge: anon_huge_kib()
        ctypes.memmove(self.ptr, src.ptr, src.nbytes)
        err, = rt.cudaHostRegister(self.ptr, size, rt.cudaHostRegisterMapped | rt.cudaHostRegisterPortable)
        if err != rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"cudaHostRegister: {err}")
        err, dptr = rt.cudaHostGetDevicePointer(self.ptr, 0)
        self.device_ptr = int(dptr)

    def device_array(self):
        iface = {"shape": (self.n_rows, self.stride), "typestr": "|u1", "data": (self.device_ptr, False),
                 "strides": None, "version": 3}
        return cuda.from_cuda_array_interface(iface, owner=self, sync=False)

    def close(self) -> None:
        from cuda.bindings import runtime as rt

        rt.cudaHostUnregister(self.ptr)


def anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return -1


def copies(src: dma.PinnedTable, n: int) -> list:
    """n more pinned tables with src's rows (timing does not depend on the values)."""
    return [dma.PinnedTable.from_array(src.host[:, :src.row_bytes]) for _ in range(n)]


def fused_us(streams, s: CorrectionSetup, tables: list, k: int, n_tb: int, reps: int) -> float:
    """µs per launch of the fused correction cycling over `tables` (device arrays) and 8 activations."""
    corrs = [co.Correction(t, s.rscale, selector.bucket_bounds(s.t, k), k, n_tb=n_tb) for t in tables]
    n = len(corrs)
    return graph_us(lambda i: corrs[i % n](s.xs[i % 8], s.act, base_out=s.base, out=s.out, stream=streams.main_n),
                    max(2 * n, 64), reps, streams)["us"]


def time_many(streams, s: CorrectionSetup, k: int, n_tb: int, gib: float, reps: int) -> dict:
    """The fused kernel rotating over as many pinned tables as make `gib` GiB (a model's worth), in
    plain pinned memory and in huge pages: does the translation of many host pages cost?"""
    n = max(1, int(gib * 2**30 // s.tables[0].nbytes))
    many = copies(s.tables[0], n)
    huge = [HugeTable(t) for t in many]
    row = {"many_tables": n, "many_gib": n * s.tables[0].nbytes / 2**30,
           "zero_many": fused_us(streams, s, [t.device_array() for t in many], k, n_tb, reps),
           "huge_many": fused_us(streams, s, [h.device_array() for h in huge], k, n_tb, reps)}
    for t in huge + many:
        t.close()
    return row


def time_variants(streams, s: CorrectionSetup, k: int, n_tb: int, huge: list, reps: int) -> dict:
    bounds = selector.bucket_bounds(s.t, k)
    x0 = s.xs[0]
    zero = [t.device_array() for t in s.tables]
    dev = cuda.to_device(s.tables[0].host)
    row = {name: fused_us(streams, s, tables, k, n_tb, reps) for name, tables in (
        ("hbm", [dev]), ("zero1", zero[:1]), ("zeroN", zero), ("huge", [h.device_array() for h in huge]))}
    row["k0"] = fused_us(streams, s, zero[:1], 0, n_tb, reps)
    xt = torch.from_numpy(x0.copy_to_host().astype(np.float32)) * torch.from_numpy(s.act.copy_to_host())
    idx = cuda.to_device(selector.select_bucket(xt, k, bounds).numpy().astype(np.int32))
    if idx.shape[0]:
        fetched = cuda.device_array((idx.shape[0], s.tables[0].stride), np.uint8)
        row["fetch"] = graph_us(lambda i: fetch_rows_cuda(zero[i % len(zero)], idx, out=fetched,
                                                          stream=streams.main_n), 64, reps, streams)["us"]
        picks, picks_x = cuda.device_array(idx.shape[0], np.int32), cuda.device_array(idx.shape[0], np.float32)
        row["select"] = graph_us(lambda i: select_bucket_cuda(s.xs[i % 8], k, bounds, out=picks, out_x=picks_x,
                                                              act_scale=s.act, stream=streams.main_n),
                                 64, reps, streams)["us"]
    row["rows"] = int(idx.shape[0])
    row["pcie_bytes"] = pcie_bytes(s.out_f, s.in_f, k)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,28672x4096,1536x640")
    ap.add_argument("--ks", default="8,32")
    ap.add_argument("--n-tb", type=int, default=16)
    ap.add_argument("--tb-sweep", default="1,2,4,8,16,32,64", help="n_tb sweep at the first shape and k")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--many-gib", type=float, default=0.0,
                    help="also rotate over this many GiB of pinned tables (plain and huge pages)")
    ap.add_argument("--launch-only", action="store_true",
                    help="launch the first shape's zero-copy correction 12 times eagerly, time nothing (for ncu)")
    args = ap.parse_args(argv)
    info = device_info()
    streams = Streams.make()
    rng = np.random.default_rng(0)
    if args.launch_only:
        out_f, in_f = map(int, args.shapes.split(",")[0].split("x"))
        k = int(args.ks.split(",")[0])
        s = CorrectionSetup(rng, out_f, in_f, info["l2_bytes"])
        corrs = s.corrections(k, args.n_tb)
        for i in range(12):
            corrs[i % len(corrs)](s.xs[i % 8], s.act, base_out=s.base, out=s.out)
        cuda.synchronize()
        return 0
    report = {"env": {**run_meta(), **info}, "rows": [], "tb_sweep": []}
    for shape in args.shapes.split(","):
        out_f, in_f = map(int, shape.split("x"))
        s = CorrectionSetup(rng, out_f, in_f, info["l2_bytes"])
        huge = [HugeTable(t) for t in s.tables]
        report["env"]["anon_huge_kib"] = anon_huge_kib()
        report["env"]["thp"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
        for k in map(int, args.ks.split(",")):
            r = {"out": out_f, "in": in_f, "k_chunk": k, "n_tb": args.n_tb, "tables": len(s.tables),
                 **time_variants(streams, s, k, args.n_tb, huge, args.reps),
                 **(time_many(streams, s, k, args.n_tb, args.many_gib, args.reps) if args.many_gib else {})}
            report["rows"].append(r)
            print(json.dumps(r), flush=True)
        if shape == args.shapes.split(",")[0]:
            k = int(args.ks.split(",")[0])
            for n_tb in map(int, args.tb_sweep.split(",")):
                us = fused_us(streams, s, [t.device_array() for t in s.tables], k, n_tb, args.reps)
                report["tb_sweep"].append({"out": out_f, "in": in_f, "k_chunk": k, "n_tb": n_tb,
                                           "blocks": co.plan_correction(out_f, n_tb).blocks, "us": us})
                print(json.dumps(report["tb_sweep"][-1]), flush=True)
        for h in huge:
            h.close()
        s.close()
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
