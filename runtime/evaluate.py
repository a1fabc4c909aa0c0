"""Quality: teacher-forced perplexity of the reference, quantized, and quantized + DecDEC models.

DecDEC is simulated in batch: for every position and linear group the selector
picks channels of that position's activation x~ = x * act_scale exactly as the decode kernel would,
and the group computes  out = deq(Q) x~ + R_hat (x~ * mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from decdec.constants import SELECTION_MODES
from decdec.models.arch import Linear, forward
from decdec.models.graph import PerGroup, per_group
from decdec.models.prepare import Prepared
from decdec.ops import selector
from decdec.ops.correction import compensate


@dataclass(frozen=True)
class DenseGroup:
    """One prepared group, dequantized once for fast batched simulation."""

    weight: torch.Tensor  # deq(Q), float32 [out, in]
    residual: torch.Tensor  # R_hat's rows, float32 [in, out] (row i = input channel i, as in the table)
    act_scale: torch.Tensor  # float32 [in]
    thresholds: torch.Tensor
    mean_abs: torch.Tensor
    bits: int


def dense_groups(prepared: Prepared) -> dict[tuple[int, str], DenseGroup]:
    return {key: DenseGroup(g.q.dequantize(), g.residual.dequantize().T, g.q.act_scale, g.thresholds, g.mean_abs,
                            g.q.bits) for key, g in prepared.groups.items()}


def select(mode: str, x: torch.Tensor, k_chunk: int, group: DenseGroup) -> torch.Tensor:
    """Channel indices [..., n] that `mode` picks for activations x [..., in]."""
    if mode == "bucket":
        return selector.select_bucket(x, k_chunk, selector.bucket_bounds(group.thresholds, k_chunk))
    if mode == "exact":
        return selector.select_exact(x, k_chunk)
    if mode == "static":
        return selector.select_static(x, k_chunk, group.mean_abs)
    raise ValueError(f"unknown selection mode {mode!r}: allowed are {SELECTION_MODES}")


def decdec_linear(groups: dict[tuple[int, str], DenseGroup], selection: str = "none", k_chunk: PerGroup = 0) -> Linear:
    """The quantized linear, with DecDEC's compensation simulated when selection != 'none'; `k_chunk`
    for every group, or per (kind, bits) as a tuned engine runs it.
    With selection 'none' any group with `weight` and `act_scale` will do (the CPU executor's too)."""

    def linear(layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        g = groups[layer, kind]
        k = per_group(k_chunk, kind, g.bits, "k_chunk")
        xs = x * g.act_scale
        out = xs @ g.weight.T
        if selection != "none" and k > 0:
            out = out + compensate(xs, select(selection, xs, k, g), g.residual)
        return out

    return linear


@torch.no_grad()
def perplexity(args, weights, windows: list[torch.Tensor], linear: Linear | None, desc: str = "perplexity",
               progress=True):
    """(perplexity, predicted tokens) over non-overlapping windows."""
    nll, count = 0.0, 0
    for window in tqdm(windows, desc=desc, disable=not progress, leave=False):
        logits = forward(args, weights, window, linear)
        nll += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        count += window.shape[0] - 1
    return math.exp(nll / count), count


def eval_windows(prepared: Prepared) -> list[torch.Tensor]:
    """Windows of at most `eval.ctx` tokens that predict exactly `eval.tokens` tokens (each predicts
    its length - 1; the last one is cut), or as many as the text holds."""
    from decdec.models.corpus import corpus_text, token_windows

    cfg, model = prepared.config, prepared.model
    if model.tokenizer is None:  # synthetic: a fixed random stream, disjoint seed from calibration
        gen = torch.Generator().manual_seed(1)
        windows = [torch.randint(0, model.args.vocab_size, (cfg.eval.ctx,), generator=gen)
                   for _ in range(math.ceil(cfg.eval.tokens / (cfg.eval.ctx - 1)))]
    else:
        windows = token_windows(model.tokenizer, corpus_text(cfg.eval.corpus, "eval"), cfg.eval.ctx, cfg.eval.tokens)
    cut, left = [], cfg.eval.tokens
    for window in windows:
        if left <= 0:
            break
        cut.append(window[:left + 1])
        left -= cut[-1].shape[0] - 1
    return cut


def eval_rows(prepared: Prepared, k_chunks: list[int | dict], selections: list[str],
              reference: bool = True) -> list[dict]:
    """Rows {model, method, bits, lm_head_bits, selection, k_chunk, ppl, tokens}: the reference (optionally),
    the quantized model alone, and quantized + DecDEC for every k_chunk > 0 and selection mode. Every row
    has the config's lm_head (the reference's too: its other weights are the float32 ones)."""
    model, cfg = prepared.model, prepared.config
    windows = eval_windows(prepared)
    base = {"model": model.source, "method": cfg.quant.method, "bits": cfg.quant.bits,
            "lm_head_bits": cfg.quant.lm_head_bits}
    rows = []

    def add(row: dict, linear) -> None:
        desc = f"perplexity {row['method']} {row['bits']:g}-bit {row['selection']} k={row['k_chunk']}"
        ppl, tokens = perplexity(model.args, model.weights, windows, linear, desc=desc)
        rows.append({**row, "ppl": ppl, "tokens": tokens})

    if reference:
        add({**base, "method": "reference", "bits": 32, "selection": "none", "k_chunk": 0}, None)  # float32 layers
    groups = dense_groups(prepared)
    add({**base, "selection": "none", "k_chunk": 0}, decdec_linear(groups))
    for k in (k for k in k_chunks if isinstance(k, dict) or k > 0):
        for mode in selections:  # a per-group dict (a tuned engine's) is labelled 'tuned'
            add({**base, "selection": mode, "k_chunk": "tuned" if isinstance(k, dict) else k},
                decdec_linear(groups, mode, k))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<16} {'method':<9} {'bits':>4} {'selection':<9} {'k_chunk':>7} {'ppl':>9} {'tokens':>7}"]
    for r in rows:
        lines.append(f"{str(r['model'])[:16]:<16} {r['method']:<9} {r['bits']:>4g} {r['selection']:<9} "
                     f"{str(r['k_chunk']):>7} {r['ppl']:>9.3f} {r['tokens']:>7}")
    return "\n".join(lines)
