"""Where compensation's fixed cost comes from: the least compensation (k_chunk 1) on one linear-group
kind at a time, at several correction sizes n_tb, timed in turns with the base step (whole step, GPU).

    DECDEC_COMMIT=<sha> python bench/fixed_cost.py [--model llama3-8b] [--n-tbs 1,4,16] [--kinds qkv,all] [--out F]

A row per (kinds, n_tb): the step's slowdown against the base step measured in the same turns, and
that extra time per compensated group (µs). A kind whose extra time falls with n_tb loses it to the
SMs the correction takes from the GEMV beside it; one whose extra time stays at every n_tb waits for
the correction's own floor (selection, PCIe round trip) or for the stream fork and join around it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--n-tbs", default="1,4,16")
    ap.add_argument("--kinds", default=",".join(LINEAR_KINDS) + ",all", help="comma list of group kinds or 'all'")
    ap.add_argument("--max-seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    run = Run("cuda", a.max_seq, (POSITION + 1,), a.steps, 5, False, None)
    prepared = synthetic_prepared(SHAPES[a.model], a.max_seq, "cuda")
    spec = prepared.config.model.source["synthetic"]
    # built with compensation, so that its model holds the residual tables; its base step is ours
    every = our_engine(dataclasses.replace(prepared, config=engine_config(spec, "cuda", {"k_chunk": 1})))
    base = Engine(every.prepared, build_graph(every.prepared.model.args, every.prepared.layer_bits, 0),
                  every.prefill_executor.plan, every.prefill_executor, 0)
    rows = []
    try:
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
        Path(a.out).write_text(json.dumps({**run_meta(), "model": a.model, "position": POSITION, "rows": rows},
                                          indent=1))


if __name__ == "__main__":
    main()
