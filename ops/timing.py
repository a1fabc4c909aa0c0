"""GPU micro-benchmarks the product needs: `decdec tune` measures the latency model with them, and
`bench/gpu_ops.py` builds its tables on them (nothing here imports `bench`).

- `graph_us`: launches captured into one CUDA graph, replayed and timed by CUDA events (per launch);
  `event_us`: CUDA events around a single large operation (or one graph replay).
- Operands are random (any bit pattern is a valid packing) and rotated through enough copies that
  every replay streams from HBM, not from L2 (`copies_for`).
- `measure_pairs` / `measure_shape`: one linear shape's base GEMV alone, and base + fused correction
  concurrently (correction on a priority -1 side stream, merged through the GEMV's split output, the
  graph's edges programmatic, as `runtime/executor_cuda.py` runs them), over a k_chunk x n_tb grid: the
  rows `MeasuredModel.from_rows` takes.
- `bandwidth`: HBM copy and read, zero-copy read of mapped host memory, H2D memcpy.

Numba's CUDA module and the kernels load only inside the functions, so `import ops.timing` works on
a machine without a GPU (and does not pre-empt the CUDA simulator the tests switch on).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

MAX_COPIES = 64  # rotation copies of one small weight / table (memory and capture time stay small)
SIDE_PRIORITY = -1  # the higher priority torch offers: the correction's few blocks are dispatched first
N_ACTIVATIONS = 8  # fresh activations cycled through the steps of one timing


# ----------------------------------------------------------------------------------------------------
# streams and timing


@dataclass
class Streams:
    """The capture stream (torch, and its Numba view) and one side stream per priority."""

    main: object  # torch.cuda.Stream
    main_n: object  # Numba external stream on `main`
    side: dict  # priority -> (Numba stream, torch stream)

    @classmethod
    def make(cls, priorities=(0, SIDE_PRIORITY)) -> "Streams":
        from numba import cuda

        main, side = torch.cuda.Stream(), {p: torch.cuda.Stream(priority=p) for p in priorities}
        numba = lambda s: cuda.external_stream(s.cuda_stream)  # noqa: E731
        return cls(main, numba(main), {p: (numba(s), s) for p, s in side.items()})

    def fork(self, fn_main, fn_side, priority: int = SIDE_PRIORITY) -> None:
        """fn_main(Numba stream) on the capture stream and fn_side on a side stream, joined again by
        torch events (graph-safe)."""
        nside, side = self.side[priority]
        forked = torch.cuda.Event()
        forked.record(self.main)
        side.wait_event(forked)
        fn_main(self.main_n)
        fn_side(nside)
        joined = torch.cuda.Event()
        joined.record(side)
        self.main.wait_event(joined)


def graph_us(step: Callable[[int], None], n_steps: int, reps: int, streams: Streams, pdl: bool = False) -> dict:
    """Median and spread of microseconds per step of a CUDA graph replaying step(0) .. step(n - 1).

    step(i) launches on the capture stream (torch's current stream while it runs; `streams.main_n`
    for Numba). Every step runs once outside the capture first (compilation, cuBLAS handles, lazily
    made scratch), as a first library call inside a capture would invalidate it. `pdl`: the graph's
    edges into our kernels become programmatic (`ops.ptx.programmatic_edges`), as in the engine's step.
    """
    from decdec.ops.ptx import pdl_supported, programmatic_edges

    with torch.cuda.stream(streams.main):
        for i in range(n_steps):
            step(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(graph, stream=streams.main):
        for i in range(n_steps):
            step(i)
    if pdl and pdl_supported():
        programmatic_edges(graph.raw_cuda_graph())
    graph.instantiate()
    times = [us / n_steps for us in event_times(graph.replay, reps)]
    del graph
    return {"us": statistics.median(times), "us_min": min(times), "us_max": max(times), "steps": n_steps, "reps": reps}


def event_times(fn: Callable[[], None], reps: int, warmup: int = 1) -> list[float]:
    """Microseconds of each of `reps` calls of fn() on the current stream, by CUDA events, after
    `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return times


def event_us(fn: Callable[[], None], reps: int, warmup: int = 1) -> float:
    """Median microseconds of fn() on the current stream, by CUDA events (large single operations,
    or one replay of a captured graph)."""
    return statistics.median(event_times(fn, reps, warmup))


def copies_for(nbytes: int, l2_bytes: int) -> int:
    """How many copies of an nbytes operand to rotate through so that replays stream from HBM."""
    return max(2, min(MAX_COPIES, math.ceil(3 * l2_bytes / max(nbytes, 1))))


def device_info() -> dict:
    """Name, SM count and L2 size of the current GPU."""
    props = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "n_sm": props.multi_processor_count,
            "l2_bytes": props.L2_cache_size}


# ----------------------------------------------------------------------------------------------------
# random operands (on the GPU, fresh for every copy)


def random_operands(out_f: int, in_f: int, bits: int, gen: torch.Generator) -> tuple:
    """(qweight, scales, zeros, act_scale) on the GPU: random packed codes (any 32-bit pattern is a
    valid packing), scales, integer zero points and activation scales, group 128."""
    groups = -(-in_f // 128)
    qweight = torch.randint(-2**31, 2**31, (out_f, in_f * bits // 32), dtype=torch.int32, device="cuda", generator=gen)
    scales = (torch.rand(out_f, groups, device="cuda", generator=gen) * 0.02 + 0.005).half()
    zeros = torch.randint(0, 2**bits, (out_f, groups), device="cuda", generator=gen).half()
    act = torch.rand(in_f, device="cuda", generator=gen) + 0.5
    return qweight, scales, zeros, act


def random_gemv(out_f: int, in_f: int, bits: int, gen: torch.Generator, plan=None):
    """A `BaseGemv` of `random_operands`."""
    from decdec.ops.base_gemv import BaseGemv

    return BaseGemv(*random_operands(out_f, in_f, bits, gen), bits, plan=plan)


def thresholds(rng: np.random.Generator, width: int) -> np.ndarray:
    """A calibrated profile from heavy-tailed samples, as models/calibrate.py computes one."""
    calib = rng.standard_t(df=3, size=(64, width)).astype(np.float32)
    return np.sort(np.abs(calib), axis=-1)[:, ::-1].max(axis=0).astype(np.float32)


def random_table(rng: np.random.Generator, out_f: int, in_f: int):
    """A residual table of random valid codes in pinned, device-mapped host memory (`ops.dma.PinnedTable`)."""
    from decdec.ops.dma import PinnedTable
    from decdec.ops.layout import pack_rows

    codes = torch.from_numpy(rng.integers(-7, 8, (out_f, in_f), dtype=np.int8))
    return PinnedTable.from_array(pack_rows(codes).numpy())


class CorrectionSetup:
    """Pinned tables (rotated past L2), activations, bounds and scales for one (out, in) shape."""

    def __init__(self, rng: np.random.Generator, out_f: int, in_f: int, l2: int):
        from numba import cuda

        self.out_f, self.in_f = out_f, in_f
        self.n_tables = copies_for(in_f * -(-out_f // 2), l2)
        self.tables = [random_table(rng, out_f, in_f) for _ in range(self.n_tables)]
        # fresh fp16 activations from the calibration distribution
        self.xs = [cuda.to_device(rng.standard_t(df=3, size=in_f).astype(np.float16)) for _ in range(N_ACTIVATIONS)]
        self.act = cuda.to_device((rng.random(in_f) + 0.5).astype(np.float32))
        self.rscale = cuda.to_device((rng.random(out_f) * 0.01 + 0.001).astype(np.float16))
        self.base = cuda.to_device(rng.standard_normal(out_f).astype(np.float16))
        self.out = cuda.device_array(out_f, np.float16)
        self.t = thresholds(rng, in_f)

    def corrections(self, k_chunk: int, n_tb: int, tile_rows: int | None = None) -> list:
        """One `Correction` per rotated table; `tile_rows` must match the GEMV it merges into."""
        from decdec.ops import correction, selector

        bounds = selector.bucket_bounds(self.t, k_chunk)
        tile_rows = tile_rows or correction.TILE_ROWS
        return [correction.Correction(t.device_array(), self.rscale, bounds, k_chunk, n_tb=n_tb, tile_rows=tile_rows)
                for t in self.tables]

    def close(self) -> None:
        for t in self.tables:
            t.close()


class GemvSetup:
    """Random GEMVs of one shape rotated past L2, their output, and the split output that a concurrent
    correction merges into (`split_for`, as in runtime/executor_cuda.py)."""

    def __init__(self, out_f: int, in_f: int, bits: int, gen: torch.Generator, l2: int):
        from numba import cuda

        first = random_gemv(out_f, in_f, bits, gen)
        self.gemvs = [first] + [random_gemv(out_f, in_f, bits, gen) for _ in range(
            copies_for(first.plan.weight_bytes, l2) - 1)]
        self.tile_rows = first.plan.merge_rows
        self.out = cuda.as_cuda_array(torch.empty(out_f, dtype=torch.float16, device="cuda"))

    def split_for(self, correction, gemvs=None):
        """Scratch for the K blocks of `gemvs` (default: the GEMVs' own plan) and `correction`'s parts."""
        return (gemvs or self.gemvs)[0].split_output(extra_parts=correction.parts)

    def beside(self, correction) -> list:
        """The GEMVs as the executor runs them beside `correction` (`BaseGemv.beside`)."""
        return [g.beside(correction.blocks) for g in self.gemvs]

    def __call__(self, i: int, x, stream, merge=None, gemvs=None) -> None:
        gemvs = gemvs or self.gemvs
        gemvs[i % len(gemvs)](x, self.out, stream=stream, merge=merge)


# ----------------------------------------------------------------------------------------------------
# what decdec tune measures


def supported_n_tbs(out_f: int, n_tbs, tile_rows: int) -> list[int]:
    """The thread-block counts a correction of `out_f` outputs really launches for the asked ones:
    blocks own whole row tiles, so asking for more blocks than tiles (or a count that does not divide
    them evenly) launches fewer; each count appears once."""
    from decdec.ops.correction import plan_correction

    return sorted({plan_correction(out_f, n_tb, tile_rows).blocks for n_tb in n_tbs})


def measure_pairs(streams: Streams, s: CorrectionSetup, g: GemvSetup, bits: int, k_chunks, n_tbs, reps: int,
                  priorities=(SIDE_PRIORITY,)) -> list[dict]:
    """Rows {out, in, bits, k_chunk, n_tb, side_priority, base_us, pair_us, pair_us_min, pair_us_max}:
    the GEMV alone, and GEMV + correction on a side stream of each priority, merged (per launch). Both
    with programmatic edges, as in the engine's step: a GEMV after a GEMV launches early, one beside a
    correction does not (`ops.ptx.programmatic_edges`), and the pair's time includes that."""
    steps = max(len(g.gemvs), s.n_tables, 64)
    base = graph_us(lambda i: g(i, s.xs[i % N_ACTIVATIONS], streams.main_n), steps, reps, streams, pdl=True)
    rows = []
    for k in k_chunks:
        for n_tb in n_tbs:
            corrs = s.corrections(k, n_tb, g.tile_rows)
            beside = g.beside(corrs[0])
            split = g.split_for(corrs[0], beside)
            for priority in priorities:

                def step(i, corrs=corrs, priority=priority, split=split, beside=beside):
                    x = s.xs[i % N_ACTIVATIONS]
                    streams.fork(lambda st: g(i, x, st, merge=split, gemvs=beside),
                                 lambda st: corrs[i % len(corrs)](x, s.act, out=g.out, merge=split, stream=st),
                                 priority)

                t = graph_us(step, steps, reps, streams, pdl=True)
                rows.append({"out": s.out_f, "in": s.in_f, "bits": bits, "k_chunk": k, "n_tb": n_tb,
                             "side_priority": priority, "base_us": base["us"], "pair_us": t["us"],
                             "pair_us_min": t["us_min"], "pair_us_max": t["us_max"]})
    return rows


def measure_shape(out_f: int, in_f: int, bits: int, k_chunks, n_tbs, reps: int = 10, *,
                  streams: Streams | None = None, seed: int = 0) -> list[dict]:
    """One linear shape on this GPU: rows {out, in, bits, k_chunk, n_tb, base_us, pair_us, ...} over
    k_chunks x n_tbs (n_tbs reduced to the counts the correction really launches, `supported_n_tbs`),
    the correction on the priority -1 side stream as the CUDA executor runs it."""
    streams = streams or Streams.make((SIDE_PRIORITY,))
    rng, gen = np.random.default_rng(seed), torch.Generator(device="cuda").manual_seed(seed)
    l2 = device_info()["l2_bytes"]
    s = CorrectionSetup(rng, out_f, in_f, l2)
    try:
        g = GemvSetup(out_f, in_f, bits, gen, l2)
        return measure_pairs(streams, s, g, bits, k_chunks, supported_n_tbs(out_f, n_tbs, g.tile_rows), reps)
    finally:
        s.close()
        torch.cuda.empty_cache()


@functools.lru_cache(maxsize=None)
def _xor_read_kernel():
    from numba import cuda, uint64

    @cuda.jit
    def xor_read(a, out):
        """Reads every uint64 of a once (grid-stride), so the loads cannot be optimised away."""
        i = cuda.grid(1)
        s = uint64(0)
        for j in range(i, a.shape[0], cuda.gridsize(1)):
            s ^= a[j]
        out[i] = s

    return xor_read


def bandwidth(reps: int, zero_copy_mib=(128,)) -> dict:
    """GB/s of: HBM read (a kernel summing 1 GiB) and zero-copy read of mapped host memory
    ("zero_copy_read_<MiB>MiB_GBps")."""
    from numba import cuda

    from decdec.ops.dma import PinnedTable

    kernel = _xor_read_kernel()
    threads, blocks = 256, device_info()["n_sm"] * 8
    sink = cuda.device_array(threads * blocks, np.uint64)
    res = {}
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    src_n = cuda.as_cuda_array(src.view(torch.int64)).view(np.uint64)
    res["hbm_read_GBps"] = n / event_us(lambda: kernel[blocks, threads](src_n, sink), reps) / 1e3
    for mib in zero_copy_mib:
        nbytes = mib << 20
        with PinnedTable(nbytes // 4096, 4096) as pinned:
            pinned.host[:] = np.random.default_rng(mib).integers(0, 255, pinned.host.shape, dtype=np.uint8)
            arr = pinned.device_array(np.uint64).reshape(nbytes // 8)
            us = event_us(lambda: kernel[blocks, threads](arr, sink), reps)
            res[f"zero_copy_read_{mib}MiB_GBps"] = nbytes / us / 1e3
    torch.cuda.empty_cache()
    return res
