"""`decdec prepare`: model -> quantized weights, residual tables, calibrated thresholds -> artifacts.

    load model -> calibration windows -> activations of every linear group
      -> per group: quantize (RTN / AWQ at the layer's bits), residual R = W' - deq(Q) at 4 bits,
         threshold profile and channel means of x~ = x * act_scale
      -> safetensors + manifest in the folder of this model + config (by default in the per-user
         cache, `decdec.config.cache_root`), reused from any directory; one prepare per folder at a time
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from decdec.models import artifacts
from decdec.models.arch import LINEAR_KINDS
from decdec.models.calibrate import (
    bits_per_layer,
    collect_activations,
    layer_sensitivity,
    mean_abs,
    threshold_profile,
)
from decdec.models.corpus import check_disjoint, corpus_text, token_windows
from decdec.models.loader import LoadedModel, load_model
from decdec.models.quantize import QuantizedLinear, quantize_awq, quantize_robust, quantize_rtn
from decdec.models.residual import ResidualTable, build_residual, effective_weight
from decdec.ops.lm_head import dequantize_rows, quantize_rows_int8
from decdec.config import Config, load_config

Group = tuple[int, str]
# Seconds per million linear weights for 2048 calibration tokens on 2 idle CPU threads (this
# project's reference machine), by quantizer: what the first-run announcement extrapolates from.
PREPARE_S_PER_MPARAM = {"rtn": 0.10, "awq": 0.28, "robust": 0.34}  # robust at k_chunk 32
SENSITIVITY_WINDOWS = 2  # windows of calibration text for the 3.5-bit layer ranking (2 x ctx tokens)


@dataclass
class PreparedGroup:
    """Everything DecDEC keeps for one linear group."""

    q: QuantizedLinear
    residual: ResidualTable
    thresholds: torch.Tensor  # float32 [in], see models/calibrate.threshold_profile
    mean_abs: torch.Tensor  # float32 [in]


@dataclass
class Prepared:
    model: LoadedModel
    groups: dict[Group, PreparedGroup]
    layer_bits: list[int]
    config: Config
    folder: Path
    reused: bool = False  # True: loaded from an earlier prepare, False: built by this one
    # quant.lm_head_bits 8: (codes uint8, scale float32) of `ops.lm_head`; model.weights["lm_head"] is then
    # their dequantized float32 weight, so every CPU path computes what the GPU's int8 kernel does
    lm_head_int8: tuple[torch.Tensor, torch.Tensor] | None = None


def artifact_key(model: LoadedModel, cfg: Config) -> dict:
    """What artifacts depend on: the model's bytes and the config that shapes preparation."""
    robust = {"k_chunk": cfg.quant_k_chunk()} if cfg.quant.method == "robust" else {}
    quant = {k: v for k, v in dataclasses.asdict(cfg.quant).items() if k != "lm_head_bits"}  # made at load: cheap
    return {
        "model_sha256": model.sha256,
        "quant": {**quant, **robust},
        "calibration": dataclasses.asdict(cfg.calibration),
        "residual_bits": cfg.decdec.residual_bits,
    }


def artifact_folder(model: LoadedModel, cfg: Config) -> Path:
    """The artifacts' folder: the config's `artifacts`, else the cache's folder for this key."""
    key = json.dumps(artifact_key(model, cfg), sort_keys=True)
    return cfg.artifact_dir(hashlib.sha256(key.encode()).hexdigest())


def calibration_windows(model: LoadedModel, cfg: Config) -> list[torch.Tensor]:
    cal = cfg.calibration
    check_disjoint(cal.corpus, cfg.eval.corpus)
    if model.tokenizer is None:  # synthetic model: random tokens are as good as any
        gen = torch.Generator().manual_seed(0)
        n = max(1, cal.tokens // cal.ctx)
        return [torch.randint(0, model.args.vocab_size, (cal.ctx,), generator=gen) for _ in range(n)]
    return token_windows(model.tokenizer, corpus_text(cal.corpus, "calibration"), cal.ctx, cal.tokens)


def quantize_group(
    weight: torch.Tensor, x: torch.Tensor, bits: int, cfg: Config
) -> tuple[QuantizedLinear, ResidualTable | None]:
    """The quantized group and, where the quantizer built it, its residual table."""
    if cfg.quant.method == "awq":
        return quantize_awq(weight, x, bits, cfg.quant.group_size), None
    if cfg.quant.method == "robust":
        return quantize_robust(weight, x, bits, cfg.quant.group_size, cfg.quant_k_chunk())
    return quantize_rtn(weight, bits, cfg.quant.group_size), None


def _map_groups(fn: Callable, items: list, desc: str, progress: bool) -> list:
    """[fn(item) for item in items] on as many Python threads as torch has CPU threads, each
    running its torch ops on one thread. One group at a time on all threads leaves cores idle in
    its many single-threaded steps (top-k, NumPy's sort, ops on small tensors); and a group's
    result, with its reductions on one thread, does not depend on the number of cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(threads)
    try:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=not progress))
    finally:  # after an error or Ctrl-C, only the groups already started are waited for
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)


def build(model: LoadedModel, cfg: Config, progress: bool = True) -> tuple[dict[Group, PreparedGroup], list[int]]:
    args, weights = model.args, model.weights
    windows = calibration_windows(model, cfg)
    with tqdm(total=len(windows), desc="calibration activations", disable=not progress) as bar:
        acts = collect_activations(args, weights, windows, bar)
    groups = [(layer, kind) for layer in range(args.n_layers) for kind in LINEAR_KINDS]
    candidate_bits = [3, 4] if cfg.quant.bits == 3.5 else [int(cfg.quant.bits)]
    candidates = [(layer, kind, bits) for layer, kind in groups for bits in candidate_bits]
    quantized = dict(zip(candidates, _map_groups(
        lambda c: quantize_group(weights[f"layers.{c[0]}.{c[1]}"], acts[c[0], c[1]], c[2], cfg), candidates,
        f"quantizing ({cfg.quant.method})", progress)))
    sensitivity = None
    if cfg.quant.bits == 3.5:
        def applied(layer, kind, bits):  # the weight applied to x itself: deq(Q) * act_scale
            q = quantized[layer, kind, bits][0]
            return q.dequantize() * q.act_scale

        sensitivity = layer_sensitivity(args, weights, windows[:SENSITIVITY_WINDOWS], applied)
    layer_bits = bits_per_layer(cfg.quant.bits, sensitivity, args.n_layers)

    def prepared_group(group: Group) -> PreparedGroup:
        q, residual = quantized[(*group, layer_bits[group[0]])]
        x_seen = acts[group] * q.act_scale  # what the quantized GEMV (and the selector) sees
        if residual is None:
            residual = build_residual(effective_weight(weights[f"layers.{group[0]}.{group[1]}"], q), q)
        return PreparedGroup(q, residual, threshold_profile(x_seen), mean_abs(x_seen))

    return dict(zip(groups, _map_groups(prepared_group, groups, "residuals + thresholds", progress))), layer_bits


def _to_tensors(groups: dict[Group, PreparedGroup]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in artifacts.FILES}
    for (layer, kind), g in groups.items():
        prefix = f"layers.{layer}.{kind}"
        out["quantized"].update(g.q.to_tensors(prefix))
        out["residuals"].update(g.residual.to_tensors(prefix))
        out["calibration"][f"{prefix}.thresholds"] = g.thresholds
        out["calibration"][f"{prefix}.mean_abs"] = g.mean_abs
    return out


def _from_tensors(tensors, layer_bits: list[int], cfg: Config) -> dict[Group, PreparedGroup]:
    groups = {}
    for layer, bits in enumerate(layer_bits):
        for kind in LINEAR_KINDS:
            prefix = f"layers.{layer}.{kind}"
            groups[layer, kind] = PreparedGroup(
                QuantizedLinear.from_tensors(tensors["quantized"], prefix, bits=bits, group_size=cfg.quant.group_size),
                ResidualTable.from_tensors(tensors["residuals"], prefix),
                tensors["calibration"][f"{prefix}.thresholds"],
                tensors["calibration"][f"{prefix}.mean_abs"],
            )
    return groups


def announcement(model: LoadedModel, cfg: Config, folder: Path) -> str:
    """What a first prepare is about to do, where, and roughly how long it takes."""
    linear = sum(w.numel() for name, w in model.weights.items() if name.startswith("layers.") and w.dim() == 2)
    per_mparam = PREPARE_S_PER_MPARAM[cfg.quant.method] * (2 if cfg.quant.bits == 3.5 else 1)
    seconds = linear / 1e6 * per_mparam * cfg.calibration.tokens / 2048 * 2 / torch.get_num_threads()
    bits = f"{cfg.quant.bits:g}-bit {cfg.quant.method.upper()}"
    return (f"preparing {model.source} for DecDEC, once: {bits} weights, {cfg.decdec.residual_bits}-bit residual "
            f"tables and selection thresholds from {cfg.calibration.tokens} calibration tokens, into {folder}\n"
            f"about {seconds:.0f} s on {torch.get_num_threads()} CPU threads (on an idle machine); "
            "every later run reuses them")


def prepare(cfg, force: bool = False, progress: bool = True, model: LoadedModel | None = None) -> Prepared:
    """Prepared artifacts for `cfg`: reused from its folder when model and config match, else built.
    A second prepare of the same folder waits for the first and then reuses its artifacts."""
    cfg = load_config(cfg)
    model = model or load_model(cfg.model.source, cfg.model.max_seq_len)
    key = artifact_key(model, cfg)
    folder = artifact_folder(model, cfg)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    with artifacts.locked(folder, lambda: say(f"waiting for another prepare of {folder} to finish")):
        if not force and artifacts.read_manifest(folder) is not None:
            tensors, info = artifacts.load_artifacts(folder, key)
            groups = _from_tensors(tensors, info["layer_bits"], cfg)
            return with_lm_head(Prepared(model, groups, info["layer_bits"], cfg, folder, reused=True))
        say(announcement(model, cfg, folder))
        groups, layer_bits = build(model, cfg, progress)
        info = {"layer_bits": layer_bits, "source": model.source, "family": model.args.family}
        artifacts.save_artifacts(folder, key, _to_tensors(groups), info)
    return with_lm_head(Prepared(model, groups, layer_bits, cfg, folder))


def with_lm_head(prepared: Prepared) -> Prepared:
    """`prepared` with its lm_head as `quant.lm_head_bits` asks (the model passed in is not changed)."""
    if prepared.config.quant.lm_head_bits == 16:
        return prepared
    codes, scale = quantize_rows_int8(prepared.model.weights["lm_head"])
    weights = {**prepared.model.weights, "lm_head": dequantize_rows(codes, scale)}
    return dataclasses.replace(prepared, model=dataclasses.replace(prepared.model, weights=weights),
                               lm_head_int8=(codes, scale))
