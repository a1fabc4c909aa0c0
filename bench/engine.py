"""End-to-end decode speed: our engine beside the gpt-fast-style anchor (bench/anchor.py), in one run.

    DECDEC_COMMIT=<sha> python bench/engine.py [--models llama3-8b,gemma3-270m,smollm2-135m]
        [--systems ours,anchor-int4,anchor-bf16] [--positions 256,2048,8192] [--targets 0.025,0.05,0.1,0.2]
        [--steps 64] [--quick] [--max-seq 8192] [--out bench/results/engine_<gpu>.json] [--merge]
    python bench/engine.py --device cpu --tiny --eager --out /tmp/engine_cpu.json     (CPU dry run)

Per model (random weights of the real shapes: timing does not depend on the values; Gemma 3 270M's
shapes as Llama-family blocks, like the anchor's) and per KV length L of --positions (the step at
position L - 1, attending to L cached positions; max_seq 8192):
  ours         our 3-bit engine, base step (target 0): `runtime.engine.compile_cuda` on a synthetic
               `Prepared` (`model.source: {synthetic: ...}`, `model.max_seq_len` = max_seq), random
               packed codes and residual tables made directly (`prepare` would quantize a float32
               copy of the model on the CPU: 32 GB and many minutes for Llama-3-8B)
  ours, target T (--targets): this GPU's latency model measured on the model's shapes in-process
               (what `decdec tune` saves), then `compile_cuda` with `decdec.target_slowdown: T`
               (tuned, captured, measured and retuned, `scheduler.tuner.tune_measured`); the row
               keeps the tuner's k_chunk and n_tb per group, its predicted slowdown and the measured
               one (device step over the base step at the same position)
  ours-lm8, ours-3.5bit, ours-4bit   our base step with an int8 lm_head (`quant.lm_head_bits: 8`), at 3.5
               bits (every other layer at 4), at 4 bits
  anchor-int4  the anchor with torch's int4 kernel (group 128) and a bf16 lm_head; `"error"` where
               torch cannot pack a shape (in_features not a multiple of 128, e.g. SmolLM2's 576)
  anchor-bf16  the anchor with bf16 linear layers
  The anchor runs compiled: torch.compile(mode="reduce-overhead", fullgraph=True) (--eager: not).
Timing, both ways, medians over --steps after warm-up:
  tokens_per_s         wall time per token as a user sees it: token id in, logits on the host out
                       (ours: engine.step(token); anchor: the compiled step on a new token tensor, .cpu())
  device_tokens_per_s  CUDA events around each step alone, issued back to back (ours: one graph replay;
                       anchor: one compiled call); on the CPU, the step without the host copy
  frac_roofline        (linear weight + lm_head bytes) / HBM read rate (measured in this run) / wall
                       step time; device_frac_roofline the same over the device step
Output: {meta of this run, "runs": [meta of every run whose rows are kept], "rows": [...]}; each row
names its run. --merge keeps the rows of another run in the file for the (model, system) pairs this
run does not measure (so one file can collect models measured in separate calls). Nothing in the
product imports this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")  # the correction's few blocks are the point

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.anchor import SHAPES, Anchor, Shapes, check_int4, compile_step, weight_bytes  # noqa: E402
from bench.meta import run_meta  # noqa: E402
from decdec.config import load_config  # noqa: E402
from decdec.constants import LINEAR_KINDS  # noqa: E402
from decdec.errors import ConfigError  # noqa: E402
from decdec.models.arch import ModelArgs  # noqa: E402
from decdec.models.graph import build_graph, group_shapes  # noqa: E402
from decdec.models.loader import LoadedModel  # noqa: E402
from decdec.models.prepare import Prepared, PreparedGroup, with_lm_head  # noqa: E402
from decdec.models.quantize import QuantizedLinear  # noqa: E402
from decdec.models.residual import ResidualTable  # noqa: E402
from decdec.runtime.engine import Engine, compile_cuda  # noqa: E402
from decdec.runtime.evaluate import dense_groups  # noqa: E402
from decdec.runtime.executor_cpu import CPUExecutor  # noqa: E402
from decdec.scheduler import latency  # noqa: E402
from decdec.scheduler.plan import MAIN, schedule  # noqa: E402

SYSTEMS = ("ours", "ours-lm8", "ours-3.5bit", "ours-4bit", "anchor-int4", "anchor-bf16")
BITS = 3  # ours (base, fixed k_chunk and tuned steps); the other systems of ours are base steps only
OTHER = {"ours-lm8": (BITS, 8), "ours-3.5bit": (3.5, 16), "ours-4bit": (4, 16)}  # system -> (bits, lm_head_bits)
MAX_SEQ = 8192
POSITIONS = (256, 2048, 8192)
TOKEN = 1  # the token fed at every step (timing does not depend on it)
BLOCK = 8  # calls of one system in a row when systems are timed in turns (`timed_together`)
TINY = Shapes(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=512, vocab_size=512)
TINY_MAX_SEQ, TINY_POSITIONS = 64, (16, 64)
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:4.0f}s] {msg}", flush=True)


@dataclasses.dataclass(frozen=True)
class Run:
    """Settings shared by every measurement of one run."""

    device: str  # "cuda" or "cpu"
    max_seq: int
    positions: tuple[int, ...]  # KV lengths; the step runs at position L - 1
    steps: int
    warmup: int
    eager: bool  # the anchor uncompiled
    hbm_GBps: float | None  # HBM read rate measured in this run (None on the CPU)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


# ----------------------------------------------------------------------------------------------------
# timing and rows


def timed(user_step, device_step, stream, run: Run) -> dict:
    """Median ms of user_step() (wall, host clock) and of device_step() (CUDA events on `stream` around
    each call, the calls issued back to back; the host clock on the CPU), after warm-up."""
    return timed_together([(user_step, device_step, stream)], run)[0]


def timed_together(systems: list[tuple], run: Run) -> list[dict]:
    """`timed` of each (user_step, device_step, stream) of `systems`, taken in turns of BLOCK calls
    each: two systems compared with each other (a compensated step and its base step) then see the
    same clocks and the same state of the host's page tables, not those of minutes apart."""
    for user_step, _, _ in systems:
        for _ in range(run.warmup):
            user_step()
    wall = [[] for _ in systems]
    device = [[] for _ in systems]
    for _ in range(-(-run.steps // BLOCK)):
        for i, (user_step, device_step, stream) in enumerate(systems):
            wall[i] += host_ms(user_step)
            device[i] += device_ms(device_step, stream) if run.cuda else host_ms(device_step)
    return [{"wall_ms": statistics.median(w), "device_ms": statistics.median(d)} for w, d in zip(wall, device)]


def host_ms(step) -> list[float]:
    """ms of BLOCK calls of step(), each by the host clock."""
    out = []
    for _ in range(BLOCK):
        t = time.perf_counter()
        step()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def device_ms(device_step, stream) -> list[float]:
    """ms of BLOCK calls of device_step(), issued back to back: CUDA events on `stream` around each."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(BLOCK)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record(stream)
        device_step()
        end.record(stream)
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def make_row(model: str, system: str, target: float, position: int, t: dict, nbytes: int, run: Run, **extra) -> dict:
    def frac(ms: float) -> float | None:
        return nbytes / (run.hbm_GBps * 1e6) / ms if run.hbm_GBps else None

    return {"model": model, "system": system, "target": target, "position": position, "kv_len": position + 1,
            "tokens_per_s": 1e3 / t["wall_ms"], "device_tokens_per_s": 1e3 / t["device_ms"], **t,
            "weight_bytes": nbytes, "frac_roofline": frac(t["wall_ms"]), "device_frac_roofline": frac(t["device_ms"]),
            "ppl": None, **extra}


def error_row(model: str, system: str, target: float, e: BaseException) -> dict:
    return {"model": model, "system": system, "target": target, "error": f"{type(e).__name__}: {e}"[:1000]}


def free_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# ours


def engine_args(s: Shapes, max_seq: int) -> dict:
    """The anchor's shapes as our synthetic model spec (ModelArgs fields, Llama family)."""
    return {"family": "llama", "vocab_size": s.vocab_size, "dim": s.dim, "n_layers": s.n_layers, "n_heads": s.n_heads,
            "n_kv_heads": s.n_kv_heads, "head_dim": s.head_dim, "ffn_dim": s.ffn_dim, "norm_eps": s.norm_eps,
            "rope_base": s.rope_base, "max_seq_len": max_seq}


def engine_config(spec: dict, device: str, decdec: dict, bits: int = BITS, lm_head_bits: int = 16):
    """The config a user would write for this synthetic model (validated by `load_config`)."""
    return load_config({"model": {"source": {"synthetic": spec}, "max_seq_len": spec["max_seq_len"]},
                        "quant": {"method": "rtn", "bits": bits, "lm_head_bits": lm_head_bits}, "decdec": decdec,
                        "device": device})


def threshold_profile(rng, width: int) -> torch.Tensor:
    """A calibrated-looking profile (models/calibrate.py): largest r-th |x| over 16 heavy-tailed samples."""
    return torch.from_numpy(np.sort(np.abs(rng.standard_t(df=3, size=(16, width))), axis=-1)[:, ::-1].max(axis=0)
                            .astype(np.float32))


def synthetic_layer_bits(bits: float, n_layers: int) -> list[int]:
    """3.5 bits: every other layer at 4 (which half is the more sensitive one does not change the time)."""
    return [4 if bits == 4 or (bits == 3.5 and i % 2) else 3 for i in range(n_layers)]


def synthetic_prepared(s: Shapes, max_seq: int, device: str, bits: float = BITS, lm_head_bits: int = 16) -> Prepared:
    """A `bits`-bit model of shapes `s` as `prepare` would hand it over, with random contents: packed codes
    and scales on `device` (scales keep each output about as large as the input, codes centred on the
    zero point, so activations stay finite through the layers), residual tables (random bytes, made on
    `device`, kept on the host) and calibrated-looking thresholds."""
    spec = engine_args(s, max_seq)
    cfg = engine_config(spec, device, {"k_chunk": 0}, bits, lm_head_bits)
    args = ModelArgs(**spec)
    gen = torch.Generator(device=device).manual_seed(0)
    rng = np.random.default_rng(0)
    dense = torch.float16 if device == "cuda" else torch.float32  # the CPU reference computes in float32
    embed = torch.randn(args.vocab_size, args.dim, device=device, generator=gen).to(dense)
    weights = {"embed": embed, "lm_head": embed, "norm": torch.ones(args.dim)}
    groups, layer_bits = {}, synthetic_layer_bits(bits, args.n_layers)
    for i, b in enumerate(layer_bits):
        weights[f"layers.{i}.attn_norm"] = weights[f"layers.{i}.ffn_norm"] = torch.ones(args.dim)
        for kind in LINEAR_KINDS:
            out_f, in_f = args.linear_shape(kind)
            n_groups = -(-in_f // 128)
            q = QuantizedLinear(
                torch.randint(-2**31, 2**31, (out_f, in_f * b // 32), dtype=torch.int32, device=device, generator=gen),
                torch.full((out_f, n_groups), 1 / (2.3 * math.sqrt(in_f)), dtype=torch.float16, device=device),
                torch.full((out_f, n_groups), 2 ** (b - 1), dtype=torch.float16, device=device),
                torch.ones(in_f, device=device), b)
            rows = torch.randint(0, 256, (in_f, -(-out_f // 2)), dtype=torch.uint8, device=device, generator=gen).cpu()
            residual = ResidualTable(rows, torch.full((out_f,), 1e-3, dtype=torch.float16))
            groups[i, kind] = PreparedGroup(q, residual, threshold_profile(rng, in_f), torch.ones(in_f))
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    model = LoadedModel(args, weights, None, "synthetic", digest)
    return with_lm_head(Prepared(model, groups, layer_bits, cfg, Path(tempfile.gettempdir())))


def our_engine(prepared: Prepared, profile=None, profile_path: Path | None = None) -> Engine:
    """`runtime.compile`'s engine for an in-memory Prepared: `compile_cuda` on the GPU (tuned to the
    config's target with `profile`, else at its k_chunk), the CPU branch of `runtime.compile` (base
    step) on the CPU."""
    if prepared.config.device == "cuda":
        k_chunk = None if profile is not None else prepared.config.decdec.k_chunk
        return compile_cuda(prepared, k_chunk, profile, profile_path)
    args = prepared.model.args
    graph = build_graph(args, prepared.layer_bits, 0)
    plan = schedule(graph, fuse=False)
    executor = CPUExecutor(args, prepared.model.weights, dense_groups(prepared), plan, prepared.config.model.max_seq_len)
    return Engine(prepared, graph, plan, executor, 0)


def close(engine: Engine) -> None:
    """Frees what `engine` holds: the CUDA executor's pinned residual tables and its device memory."""
    model = getattr(engine.executor, "model", None)  # the CUDA executor's DeviceModel
    if model is not None:
        model.close()
    engine.executor = engine.prefill_executor = None  # their graphs and buffers go with the next collection
    free_gpu()


def time_ours(engines: list[Engine], run: Run) -> dict[int, list[dict]]:
    """position -> timing of each of `engines` at each KV length of the run (`timed_together`)."""
    return {kv_len - 1: timed_together([our_steps(e, kv_len - 1, run) for e in engines], run)
            for kv_len in run.positions}


def our_steps(engine: Engine, p: int, run: Run) -> tuple:
    """(user_step, device_step, stream) of `engine` at position p, as `timed_together` takes them."""
    def user_step():
        engine.position = p
        return engine.step(TOKEN)

    ex = engine.executor
    if run.cuda:
        return user_step, lambda: ex.replay_only(p), ex.streams[MAIN]
    return user_step, lambda: ex.run(TOKEN, p), None


def our_bytes(s: Shapes, bits: float = BITS, lm_head_bits: int = 16) -> int:
    """Our step's minimal HBM read: packed codes with fp16 scale and zero per group of 128, and the lm_head
    (fp16, or int8 with a float32 scale per row)."""
    lm_head = s.vocab_size * s.dim * 2 if lm_head_bits == 16 else s.vocab_size * (s.dim + 4)
    return int(sum(latency.weight_bytes(o, i, b) for b in synthetic_layer_bits(bits, s.n_layers)
                   for o, i in s.linear_shapes().values()) + lm_head)


def base_step(name: str, s: Shapes, run: Run, system: str, emit) -> tuple[Prepared, Engine, int]:
    """`system`'s base step (ours at BITS, or as OTHER says) at every position: (the model, its engine, which
    the caller closes, its bytes)."""
    bits, lm_head_bits = OTHER.get(system, (BITS, 16))
    t0 = time.perf_counter()
    prepared = synthetic_prepared(s, run.max_seq, run.device, bits, lm_head_bits)
    log(f"{name}: random {bits}-bit model, {lm_head_bits}-bit lm_head, made in {time.perf_counter() - t0:.1f} s")
    nbytes = our_bytes(s, bits, lm_head_bits)
    engine = our_engine(prepared)
    log(f"{name}: {system} built; timing the base step")
    try:
        for p, [t] in time_ours([engine], run).items():
            emit(make_row(name, system, 0.0, p, t, nbytes, run))
    except BaseException:
        close(engine)
        raise
    return prepared, engine, nbytes


def ours(name: str, s: Shapes, run: Run, targets: list[float], k_chunks: list[int], quick: bool, emit) -> None:
    """The base step at every position, then each fixed k_chunk's step and each target's tuned step (GPU),
    each timed in turns with the base step (kept alive for that)."""
    prepared, base, nbytes = base_step(name, s, run, "ours", emit)
    try:
        if not (targets or k_chunks):
            return
        if not run.cuda:
            log(f"{name}: compensated steps skipped (they need the GPU's pinned residual tables)")
            return
        for k in k_chunks:
            compensated(name, prepared, base, nbytes, run, emit, 0.0, {"k_chunk": k})
        if not targets:
            return
        from decdec.runtime.tune import measure_profile

        shapes = group_shapes(prepared.model.args, prepared.layer_bits)
        t0 = time.perf_counter()
        profile = measure_profile(shapes, quick=quick, progress=False)
        path = Path(tempfile.mkdtemp()) / "profile.json"
        profile.save(path)
        log(f"{name}: measured this GPU on {len(shapes)} group shapes in {time.perf_counter() - t0:.0f} s (decdec tune)")
        for target in targets:
            compensated(name, prepared, base, nbytes, run, emit, target, {"target_slowdown": target}, profile, path)
    finally:
        close(base)


def compensated(name: str, prepared: Prepared, base: Engine, nbytes: int, run: Run, emit, target: float,
                decdec: dict, profile=None, path: Path | None = None) -> None:
    """One compensated step, `decdec` its config section: a fixed k_chunk on every group (target 0),
    or a target slowdown tuned with `profile` (saved at `path`); timed at every position in turns with
    the `base` engine, the slowdown against that (`base_device_ms`). An unreachable target is an error row."""
    what = f"target {target:.1%}" if target else f"k_chunk {decdec.get('k_chunk')}"
    try:
        cfg = engine_config(prepared.config.model.source["synthetic"], prepared.config.device, decdec)
        engine = our_engine(dataclasses.replace(prepared, config=cfg), profile, path)
    except ConfigError as e:  # an unreachable target is a result too
        log(f"{name}: {what}: {e}")
        emit(error_row(name, "ours", target, e))
        return
    try:
        tu = engine.tuning
        if tu is not None:
            extra = {"predicted_slowdown": tu.predicted_slowdown,
                     "tuner_slowdown": tu.measured_step_us / tu.step_us - 1,  # tune_measured's own (paired) check
                     "tuner_rounds": len(tu.rounds),
                     # each round's budget, predicted and measured slowdown and plan: where the search went
                     "tuner_search": [[r.budget, r.predicted_step_us / tu.step_us - 1, r.measured_step_us / tu.step_us - 1,
                                       {f"{kind}@{bits}": k for (kind, bits), k in r.k_chunks}] for r in tu.rounds],
                     "k_chunk": {f"{kind}@{bits}": c.k_chunk for (kind, bits), c in tu.choices.items()},
                     "n_tb": {f"{kind}@{bits}": c.n_tb for (kind, bits), c in tu.choices.items()}}
            log(f"{name}: {what} tuned (predicted {tu.predicted_slowdown:+.1%}); timing")
        else:
            keys = [f"{kind}@{bits}" for kind, bits in group_shapes(prepared.model.args, prepared.layer_bits)]
            extra = {"k_chunk": dict.fromkeys(keys, decdec["k_chunk"]), "n_tb": dict.fromkeys(keys, 0)}
        for p, (b, t) in time_ours([base, engine], run).items():
            emit(make_row(name, "ours", target, p, t, nbytes, run, slowdown=t["device_ms"] / b["device_ms"] - 1,
                          base_device_ms=b["device_ms"], **extra))
    finally:
        close(engine)


# ----------------------------------------------------------------------------------------------------
# the anchor


def anchor(name: str, s: Shapes, quant: str | None, run: Run, emit) -> None:
    """The anchor at every position; one error row where it cannot be built or run."""
    system = f"anchor-{quant or 'bf16'}"
    model = step = None
    try:
        if quant and not run.cuda:
            raise RuntimeError("skipped: torch's int4 kernel (_weight_int4pack_mm, tinygemm) runs on CUDA only")
        if quant:
            check_int4(run.device)
        t0 = time.perf_counter()
        skips = counters["inductor"]["cudagraph_skips"]
        model = Anchor(s, run.max_seq, quant, device=run.device)
        step = model if run.eager else compile_step(model)
        log(f"{name}: {system} built in {time.perf_counter() - t0:.1f} s"
            + ("" if run.eager else "; compiling (torch.compile, reduce-overhead, first calls)"))
        rows = []
        with torch.no_grad():
            tok = torch.tensor([[TOKEN]], device=run.device)
            for kv_len in run.positions:
                p = kv_len - 1
                pos = torch.tensor([p], device=run.device)

                def call(token, pos=pos):
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten
                    return step(token, pos)

                def user_step(call=call):  # a token id from the host, its logits back on the host
                    return call(torch.tensor([[TOKEN]], device=run.device)).to("cpu")

                t0 = time.perf_counter()
                user_step()
                if p == run.positions[0] - 1:
                    log(f"{name}: {system} first step {time.perf_counter() - t0:.1f} s")
                t = timed(user_step, lambda call=call: call(tok), None if not run.cuda else
                          torch.cuda.current_stream(), run)
                rows.append(make_row(name, system, 0.0, p, t, weight_bytes(s, quant), run))
        skipped = None if run.eager else counters["inductor"]["cudagraph_skips"] - skips
        for r in rows:  # cudagraph_skips: compiled steps that torch ran without its CUDA graphs (0 expected)
            emit({**r, "cudagraph_skips": skipped})
    except Exception as e:  # noqa: BLE001 - torch int4 rejects some widths; one system failing keeps the others
        log(f"{name}: {system}: {type(e).__name__}: {str(e)[:300]}")
        if not str(e).startswith("skipped") and "isEvenDivisor" not in str(e):
            traceback.print_exc()
        emit(error_row(name, system, 0.0, e))
    finally:
        del model, step
        torch._dynamo.reset()  # frees the compiled graphs and their CUDA graph memory pool
        free_gpu()


# ----------------------------------------------------------------------------------------------------
# the results file


def gpu_slug(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'CPU: x86_64' -> 'cpu'."""
    if device.startswith("CPU"):
        return "cpu"
    words = re.findall(r"[a-z0-9]+", device.lower())
    return next((w for w in words if re.fullmatch(r"[a-z]+\d+[a-z0-9]*", w)), "-".join(words) or "gpu")


def previous(path: Path, device: str) -> tuple[list, list]:
    """(runs, rows) already in `path` (--merge); refused when they come from another device."""
    if not path.exists():
        return [], []
    old = json.loads(path.read_text())
    if old["device"] != device:
        raise SystemExit(f"{path} holds rows measured on {old['device']}, this is {device}: name another --out")
    return old["runs"], old["rows"]


def summary(rows: list[dict]) -> str:
    lines = [f"{'model':<13} {'kv':>5} {'system':<12} {'target':>6} {'tok/s':>8} {'device':>8} {'roofline':>8} "
             f"{'slowdown':>8}"]
    for r in rows:
        head = f"{r['model']:<13} {r.get('kv_len', ''):>5} {r['system']:<12} {r['target']:>6.1%}"
        if "error" in r:
            lines.append(f"{head} {r['error'][:80]}")
            continue
        roof = f"{r['frac_roofline']:.0%}" if r["frac_roofline"] is not None else "-"
        slow = f"{r['slowdown']:+.1%}" if "slowdown" in r else ""
        lines.append(f"{head} {r['tokens_per_s']:>8.1f} {r['device_tokens_per_s']:>8.1f} {roof:>8} {slow:>8}")
    return "\n".join(lines)


def csv(text: str, cast) -> list:
    return [cast(x) for x in text.split(",") if x]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(SHAPES), help=f"comma list of: {', '.join(SHAPES)}")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of: {', '.join(SYSTEMS)}")
    ap.add_argument("--positions", default=None, help="KV lengths, comma list (default 256,2048,8192)")
    ap.add_argument("--targets", default="", help="target slowdowns for ours, e.g. 0.025,0.05,0.1,0.2 (GPU)")
    ap.add_argument("--max-seq", type=int, default=None, help=f"KV cache length (default {MAX_SEQ}; tiny {TINY_MAX_SEQ})")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 64; tiny 8)")
    ap.add_argument("--k-chunks", default="", help="fixed k_chunks on every group for ours, e.g. 1,4 (GPU)")
    ap.add_argument("--quick", action="store_true", help="the quick profile grid for --targets")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help=f"one tiny model ({TINY}), max_seq {TINY_MAX_SEQ}")
    ap.add_argument("--eager", action="store_true", help="run the anchor uncompiled")
    ap.add_argument("--out", default=None, help="default bench/results/engine_<gpu>.json")
    ap.add_argument("--merge", action="store_true", help="keep the file's rows of other (model, system) pairs")
    a = ap.parse_args(argv)
    systems = csv(a.systems, str)
    models = {"tiny": TINY} if a.tiny else {m: SHAPES[m] for m in csv(a.models, str)}
    unknown = [x for x in systems if x not in SYSTEMS]
    if unknown or ((a.targets or a.k_chunks) and "ours" not in systems):
        ap.error(f"unknown systems {unknown}" if unknown else "--targets and --k-chunks need the system 'ours' (its "
                 "base step)")
    max_seq = a.max_seq or (TINY_MAX_SEQ if a.tiny else MAX_SEQ)
    positions = tuple(csv(a.positions, int)) if a.positions else (TINY_POSITIONS if a.tiny else POSITIONS)
    if not all(1 <= p <= max_seq for p in positions):
        ap.error(f"--positions must lie in 1 .. {max_seq} (max_seq)")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here: use --device cpu (with --tiny for a dry run)")
    meta = run_meta()
    try:
        from importlib.metadata import version

        meta["numba_cuda"] = version("numba-cuda")
    except Exception:  # noqa: BLE001 - provenance only
        meta["numba_cuda"] = None
    hbm = None
    if a.device == "cuda":
        from decdec.ops import timing

        hbm = timing.bandwidth(10, zero_copy_mib=())["hbm_read_GBps"]
        log(f"{meta['device']}: HBM read {hbm:.0f} GB/s")
    run = Run(a.device, max_seq, positions, a.steps or (8 if a.tiny else 64), 2 if a.tiny else 5, a.eager, hbm)
    out = Path(a.out or Path(__file__).parent / "results" / f"engine_{gpu_slug(meta['device'])}.json")
    runs, kept = previous(out, meta["device"]) if a.merge else ([], [])
    measured = {(m, x) for m in models for x in systems}
    kept = [r for r in kept if (r["model"], r["system"]) not in measured]
    runs = [x for x in runs if any(r["run"] == x["id"] for r in kept)]
    this = {"id": max((x["id"] for x in runs), default=-1) + 1, **meta, "hbm_read_GBps": hbm, "max_seq": max_seq,
            "steps": run.steps}
    result = {**meta, "max_seq": max_seq, "bits": BITS, "runs": runs + [this], "rows": kept}
    out.parent.mkdir(parents=True, exist_ok=True)

    def emit(row: dict) -> None:  # saved after every row: a run cut off keeps what it measured
        result["rows"].append({**row, "run": this["id"]})
        out.write_text(json.dumps(result, indent=1))

    for name, s in models.items():
        log(f"{name}: {s}")
        if "ours" in systems:
            try:
                ours(name, s, run, csv(a.targets, float), csv(a.k_chunks, int), a.quick, emit)
            except Exception as e:  # noqa: BLE001 - one model failing must not lose the others' numbers
                traceback.print_exc()
                emit(error_row(name, "ours", 0.0, e))
        for system in (x for x in OTHER if x in systems):
            try:
                close(base_step(name, s, run, system, emit)[1])
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                emit(error_row(name, system, 0.0, e))
        for quant in (q for q, x in (("int4", "anchor-int4"), (None, "anchor-bf16")) if x in systems):
            anchor(name, s, quant, run, emit)
    out.write_text(json.dumps(result, indent=1))
    print(summary([r for r in result["rows"] if r["run"] == this["id"]]))
    log(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
