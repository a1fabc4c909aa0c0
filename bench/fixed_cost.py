"""Where compensation's fixed cost comes from: the least compensation (k_chunk 1) on one linear-group
kind at a time, at several correction sizes n_tb, timed in turns with the base step (whole step, GPU).

    DECDEC_COMMIT=<sha> python bench/fixed_cost.py [--model llama3-8b] [--n-tbs 1,4,16] [--kinds qkv,all] [--out F]

A row per (kinds, n_tb): the step's slowdown against the base step measured in the same turns, and
that extra time per compensated group (µs). A kind whose extra time falls with n_tb loses it to the
SMs the correction takes from the GEMV beside it; one whose extra time stays at every n_tb waits for
the correction's own floor (selection, PCIe round trip) or for the stream fork and join around it.

`timeline` (every kind compensated, and the base step) reads the kernels' start and end times from a
CUPTI trace of graph replays: per group kind, when the GEMV and the correction start after the
kernel before them ends, how long each runs, and by how much the correction ends after its GEMV. A
kernel launched early (programmatic launch) counts its wait for the kernel before it in its duration;
the ends are exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.anchor import SHAPES  # noqa: E402
from bench.engine import (Run, close, engine_config, free_gpu, log, our_engine, our_steps,  # noqa: E402
                          synthetic_prepared, timed_together)
from bench.meta import run_meta  # noqa: E402
from decdec.constants import LINEAR_KINDS  # noqa: E402
from decdec.models.graph import build_graph  # noqa: E402
from decdec.runtime.engine import Engine  # noqa: E402
from decdec.runtime.executor_cuda import CUDAExecutor  # noqa: E402
from decdec.scheduler.plan import schedule  # noqa: E402

POSITION = 255


def compensated(base: Engine, kinds: tuple[str, ...], n_tb: int) -> Engine:
    """`base`'s model (its residual tables loaded) compensated at k_chunk 1 on the groups of `kinds`
    only, n_tb correction blocks each; it shares the model and the KV cache."""
    args, bits = base.prepared.model.args, base.prepared.layer_bits
    shapes = {(kind, b) for b in set(bits) for kind in LINEAR_KINDS}
    graph = build_graph(args, bits, {s: int(s[0] in kinds) for s in shapes}, {s: n_tb for s in shapes})
    executor = CUDAExecutor(base.executor.model, schedule(graph), base.prepared.config.model.max_seq_len,
                            cache=base.executor.cache)
    return Engine(base.prepared, graph, executor.plan, executor, 1, base.executor)


def kernels_of_replays(engine: Engine, n: int) -> list[list[tuple[str, float, float]]]:
    """(name, start µs, end µs) of each kernel of each of `n` replays at POSITION, in start order (CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    ex = engine.executor
    ex.replay_only(POSITION)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            ex.replay_only(POSITION)
            torch.cuda.synchronize()
    path = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(path))
    events = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in json.loads(path.read_text())["traceEvents"]
                    if e.get("cat") == "kernel")
    per_step = len(events) // n
    return [[(name, t0, t1) for t0, t1, name in events[i * per_step:(i + 1) * per_step]] for i in range(n)]


def timeline(engine: Engine, n: int = 8) -> dict[str, dict[str, float]]:
    """Per group kind (in layer order): median µs of each GEMV's (and its correction's) start after the
    end of the kernel before them, duration, and the correction's end after the GEMV's."""
    kinds = list(LINEAR_KINDS)
    out: dict[str, dict[str, list]] = {k: {} for k in kinds}
    for kernels in kernels_of_replays(engine, n):
        gemv_i = 0
        for i, (name, t0, t1) in enumerate(kernels):
            if "_mma_kernel" not in name or i == 0:
                continue
            kind = kinds[gemv_i % len(kinds)]
            gemv_i += 1
            corr = kernels[i - 1] if "_correction_kernel" in kernels[i - 1][0] else None
            up = kernels[i - 2] if corr else kernels[i - 1]
            got = {"gemv_start": t0 - up[2], "gemv_us": t1 - t0}
            if corr:
                got.update(corr_start=corr[1] - up[2], corr_us=corr[2] - corr[1], corr_end_after_gemv=corr[2] - t1)
            for key, v in got.items():
                out[kind].setdefault(key, []).append(v)
    return {k: {key: statistics.median(v) for key, v in d.items()} for k, d in out.items() if d}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--n-tbs", default="1,4,16")
    ap.add_argument("--kinds", default=",".join(LINEAR_KINDS) + ",all", help="comma list of group kinds or 'all'")
    ap.add_argument("--max-seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--timeline", action="store_true", help="also the CUPTI timeline of the base and k_chunk 1 steps")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    unknown = [k for k in a.kinds.split(",") if k not in LINEAR_KINDS + ("all",)]
    if unknown:
        ap.error(f"--kinds: unknown {unknown}; allowed {', '.join(LINEAR_KINDS)}, all")
    run = Run("cuda", a.max_seq, (POSITION + 1,), a.steps, 5, False, None)
    prepared = synthetic_prepared(SHAPES[a.model], a.max_seq, "cuda")
    spec = prepared.config.model.source["synthetic"]
    # built with compensation, so that its model holds the residual tables; its base step is ours
    every = our_engine(dataclasses.replace(prepared, config=engine_config(spec, "cuda", {"k_chunk": 1})))
    base = Engine(every.prepared, build_graph(every.prepared.model.args, every.prepared.layer_bits, 0),
                  every.prefill_executor.plan, every.prefill_executor, 0)
    rows, timelines = [], {}
    try:
        if a.timeline:
            for name, engine in (("base", base), ("k_chunk 1, every group", every)):
                timelines[name] = timeline(engine)
                for kind, d in timelines[name].items():
                    log(f"{name:<22} {kind:<8} " + "  ".join(f"{k} {v:5.1f}" for k, v in d.items()))
        for kinds in [tuple(LINEAR_KINDS) if k == "all" else (k,) for k in a.kinds.split(",")]:
            for n_tb in (int(x) for x in a.n_tbs.split(",")):
                engine = compensated(base, kinds, n_tb)
                b, t = timed_together([our_steps(base, POSITION, run), our_steps(engine, POSITION, run)], run)
                groups = sum(1 for launch in engine.plan.launches if "correction" in launch.op)
                extra_us = (t["device_ms"] - b["device_ms"]) * 1e3
                rows.append({"kinds": list(kinds), "n_tb": n_tb, "groups": groups, "base_ms": b["device_ms"],
                             "step_ms": t["device_ms"], "slowdown": t["device_ms"] / b["device_ms"] - 1,
                             "extra_us_per_group": extra_us / groups})
                r = rows[-1]
                log(f"{'+'.join(kinds):<20} n_tb {n_tb:>3}: {r['base_ms'] * 1e3:7.1f} -> {r['step_ms'] * 1e3:7.1f} µs "
                    f"({r['slowdown']:+.1%}), {r['extra_us_per_group']:5.2f} µs per group")
                engine.executor = None  # its graph and buffers; the shared model stays
                free_gpu()
    finally:
        close(every)
    if a.out:
        Path(a.out).write_text(json.dumps({**run_meta(), "model": a.model, "position": POSITION, "rows": rows,
                                           "timeline_us": timelines}, indent=1))


if __name__ == "__main__":
    main()
