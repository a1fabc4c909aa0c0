"""`decdec` command line. Every verb works with no CFG on a fresh machine (the embedded default model).

Bad input prints one line, `error: ...`, and exits with status 2; Ctrl-C prints one line and exits
with 130. Nothing half-written is left. Status and progress go to stderr; generated text to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from decdec.constants import SELECTION_MODES
from decdec.errors import ConfigError, DecDECError, InputError


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# flag -> the least value allowed; checked before anything slow
AT_LEAST = {"ctx": 2, "max_tokens": 1, "max_new_tokens": 1, "ppl_tokens": 0, "steps": 1}


def _check_flags(args) -> None:
    for name, low in AT_LEAST.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise InputError(f"--{name.replace('_', '-')} {value} is out of range: allowed {low} or more")


def _config(args) -> "Config":  # noqa: F821 - imported lazily to keep `decdec --help` fast
    from decdec.config import load_config

    _check_flags(args)
    flags = {"corpus": getattr(args, "corpus", None), "ctx": getattr(args, "ctx", None),
             "tokens": getattr(args, "max_tokens", None)}  # eval.* fields; verbs without them have None
    merged = dataclasses.asdict(load_config(args.cfg))
    merged["eval"].update({field: value for field, value in flags.items() if value not in (None, "")})
    if args.artifacts:
        merged["artifacts"] = args.artifacts
    return load_config(merged)  # the flags validated with the rest, as one config


def cmd_prepare(args) -> None:
    from decdec.models.prepare import prepare

    prepared = prepare(_config(args), force=args.force)
    how = "reused" if prepared.reused else "ready"
    print(f"artifacts {how} in {prepared.folder} ({len(prepared.groups)} linear groups, layer bits {prepared.layer_bits})")


def cmd_eval(args) -> None:
    from decdec.models.prepare import prepare
    from decdec.runtime.evaluate import eval_rows, format_table

    cfg = _config(args)
    selections = args.selection.split(",")
    for mode in selections:
        if mode not in SELECTION_MODES[:-1]:  # 'none' is k = 0
            raise ConfigError(f"--selection '{mode}' is not allowed: allowed are {', '.join(SELECTION_MODES[:-1])}")
    for k in args.k_chunk:  # before minutes of preparation, not after
        if not 0 <= k <= cfg.decdec.chunk_size:
            raise ConfigError(f"--k-chunk {k} is out of range: allowed 0 .. {cfg.decdec.chunk_size} (the chunk size)")
    prepared = prepare(cfg, force=args.force)
    rows = eval_rows(prepared, args.k_chunk, selections, reference=not args.no_reference)
    print(format_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
        print(f"wrote {args.json}")


def cmd_run(args) -> None:
    from decdec import runtime
    from decdec.runtime.evaluate import eval_rows, format_table

    cfg = _config(args)
    engine = runtime.compile(cfg, force=args.force)
    k_text = f"k_chunk {engine.k_chunk}" if engine.tuning is None else "k_chunk tuned per group (below)"
    print(f"model {engine.prepared.model.source}, {cfg.quant.method} {cfg.quant.bits:g}-bit, "
          f"DecDEC {k_text} ({cfg.decdec.selection} selection), device {cfg.device}", file=sys.stderr)
    if engine.tuning is not None:
        print(engine.tuning.format(), file=sys.stderr)
    print(f"\n{args.prompt}", end="", flush=True)
    start, first, ids = time.perf_counter(), None, []
    for piece in engine.stream(args.prompt, max_new_tokens=args.max_new_tokens, ids=ids):
        first = first or time.perf_counter()
        print(piece, end="", flush=True)
    seconds = time.perf_counter() - start
    print("\n")
    print(f"{len(ids)} tokens in {seconds:.1f} s: {len(ids) / seconds:.1f} tokens/s"
          + (f" (the first after {first - start:.2f} s, with the prompt's prefill)" if first else ""), file=sys.stderr)
    if args.ppl_tokens > 0:
        small = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, tokens=args.ppl_tokens))
        prepared = dataclasses.replace(engine.prepared, config=small)
        ks = [engine.k_chunk] if engine.k_chunk else []  # tuned: the per-group mix, as the engine runs it
        print(f"perplexity over {args.ppl_tokens} tokens of evaluation text (reference: the model's own weights "
              "in float32; then quantized, then quantized + DecDEC):", file=sys.stderr)
        print(format_table(eval_rows(prepared, ks, ["bucket"], reference=True)))


def cmd_chat(args) -> None:
    from decdec import runtime
    from decdec.runtime.chat import chat

    engine = runtime.compile(_config(args), force=args.force)

    def lines():
        while True:
            try:
                yield input("> " if sys.stdin.isatty() else "")
            except EOFError:
                return

    chat(engine, lines(), lambda text: print(text, end="", flush=True),
         lambda text: print(text, file=sys.stderr, flush=True), args.max_new_tokens, args.temperature)


def _layer_bits(cfg, model) -> list[int]:
    from decdec.models.artifacts import read_manifest
    from decdec.models.prepare import artifact_folder

    if cfg.quant.bits != 3.5:
        return [int(cfg.quant.bits)] * model.args.n_layers
    manifest = read_manifest(artifact_folder(model, cfg))
    if manifest is None:
        raise ConfigError("3.5-bit layer bits are chosen by `decdec prepare`: run it first")
    return manifest["info"]["layer_bits"]


def cmd_graph(args) -> None:
    from decdec.models.graph import build_graph
    from decdec.models.loader import load_model
    from decdec.runtime.engine import engine_k_chunk
    from decdec.scheduler.plan import schedule

    cfg = _config(args)
    k_chunk = engine_k_chunk(cfg)
    if k_chunk is None:  # the tuner chooses k_chunk and n_tb on the GPU, at compile time
        from decdec import runtime

        engine = runtime.compile(cfg)
        graph = engine.graph
        print(engine.plan.format())
        print(engine.tuning.format())
    else:
        model = load_model(cfg.model.source, cfg.model.max_seq_len)
        graph = build_graph(model.args, _layer_bits(cfg, model), k_chunk)
        print(schedule(graph).format())
    counts = Counter(node.op for node in graph.nodes)
    print(f"\n{len(graph.nodes)} nodes: " + ", ".join(f"{op} {n}" for op, n in counts.items()))


def cmd_tune(args) -> None:
    from decdec.runtime.tune import format_profile, measure_profile, profile_path, require_gpu

    cfg = _config(args)
    require_gpu("`decdec tune` measures this machine's GPU")  # before loading the model or anything slow
    import torch

    from decdec.models.graph import group_shapes
    from decdec.models.loader import load_model

    model = load_model(cfg.model.source, cfg.model.max_seq_len)
    shapes = group_shapes(model.args, _layer_bits(cfg, model))
    profile = measure_profile(shapes, quick=args.quick)
    path = Path(args.out) if args.out else profile_path(cfg, torch.cuda.get_device_name())
    profile.save(path)
    print(format_profile(profile, shapes))
    print(f"wrote {path}")


def cmd_profile(args) -> None:
    from decdec import runtime
    from decdec.runtime.profiler import profile_steps

    engine = runtime.compile(_config(args), force=args.force)
    print(profile_steps(engine, args.steps, args.trace, eager=args.eager))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decdec", description="DecDEC: low-bit LLM decoding with dynamic error compensation")
    sub = p.add_subparsers(dest="verb", required=True)

    def verb(name: str, help: str, fn, force: bool = True):
        v = sub.add_parser(name, help=help)
        v.add_argument("cfg", nargs="?", default=None, help="model config (YAML); default: the embedded Gemma 3 270M, 3-bit AWQ")
        v.add_argument("--artifacts", help="artifact folder (overrides the config)")
        if force:
            v.add_argument("--force", action="store_true", help="rebuild the artifacts even if matching ones exist")
        v.set_defaults(fn=fn)
        return v

    verb("prepare", "quantize, build residuals, calibrate thresholds, write artifacts", cmd_prepare)
    v = verb("eval", "perplexity: reference / quantized / quantized + DecDEC", cmd_eval)
    v.add_argument("--corpus", help="evaluation text file (default: CPython's language reference, eval half)")
    v.add_argument("--ctx", type=int, help="window length in tokens")
    v.add_argument("--max-tokens", type=int, help="tokens evaluated")
    v.add_argument("--k-chunk", type=_int_list, default=[0, 8, 16, 32, 64], help="comma-separated k_chunk values")
    v.add_argument("--selection", default="bucket,exact,static", help="comma-separated: bucket, exact, static")
    v.add_argument("--no-reference", action="store_true", help="skip the full-precision row")
    v.add_argument("--json", help="write {'rows': [...]} here")

    v = verb("run", "generate text with DecDEC (streamed) and print a short perplexity comparison", cmd_run)
    v.add_argument("--prompt", default="The capital of France is")
    v.add_argument("--max-new-tokens", type=int, default=32)
    v.add_argument("--ppl-tokens", type=int, default=512, help="tokens for the perplexity comparison (0: skip)")

    v = verb("chat", "chat with the model: one line a turn on stdin, replies streamed, in its chat format", cmd_chat)
    v.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens")
    v.add_argument("--temperature", type=float, default=0.0, help="0: greedy")

    verb("graph", "print the compiled op graph: per layer, ops in order with streams, k_chunk and n_tb", cmd_graph,
         force=False)

    v = verb("tune", "measure this GPU on the model's linear shapes: the device profile the tuner uses", cmd_tune,
             force=False)
    v.add_argument("--out", help="profile JSON to write (default: decdec.device_profile, else "
                                 "~/.cache/decdec/device-profiles/<GPU name>.json)")
    v.add_argument("--quick", action="store_true", help="a smaller k_chunk x n_tb grid and fewer repetitions")

    v = verb("profile", "decode some steps and print a per-op timeline; write a Chrome trace", cmd_profile)
    v.add_argument("--steps", type=int, default=8)
    v.add_argument("--trace", help="write a Chrome-trace JSON here (opens in Perfetto)")
    v.add_argument("--eager", action="store_true",
                   help="GPU: also time the step launched op by op from Python (mostly launch gaps), "
                        "beside the per-op timing inside the graph replay")
    return p


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while they wait starve each other on busy cores (torch's elementwise
    # ops slow down many times over); waiting threads sleep instead. libgomp reads this when torch
    # loads, which no verb has done yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except DecDECError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # artifacts are renamed into place, manifest last: nothing half-written is trusted
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
