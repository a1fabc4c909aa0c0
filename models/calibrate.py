"""Calibration: the activations every linear group sees, and the statistics DecDEC keeps of them.

- `collect_activations`: run the reference model over calibration windows and keep the input rows
  of every linear group (q/k/v share one, gate/up share one).
- `threshold_profile`: t[r] = the largest r-th biggest |x~| seen at any position (the paper's
  calibration); the selector derives its two bucket thresholds from it for any k_chunk.
- `layer_sensitivity`: how much the output distribution suffers when one layer drops from 4 to 3
  bits; the "3.5-bit" point gives 4 bits to the more sensitive half of the layers.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from decdec.models.arch import ModelArgs, forward, hidden, reference_linear

Group = tuple[int, str]  # (layer, kind)


@torch.no_grad()
def collect_activations(args: ModelArgs, weights, windows: list[torch.Tensor], progress=None) -> dict[Group, torch.Tensor]:
    """Input rows [N, in] of every linear group over all positions of all windows (float32).
    The decoder blocks run without the final norm and lm_head: no linear group follows them, and
    with a large vocabulary the logits would cost more than all the layers."""
    rows: dict[Group, list[torch.Tensor]] = {}
    ref = reference_linear(weights)

    def recording_linear(layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        rows.setdefault((layer, kind), []).append(x.clone())
        return ref(layer, kind, x)

    for window in windows:
        hidden(args, weights, window, recording_linear)
        if progress:
            progress.update(1)
    return {group: torch.cat(parts) for group, parts in rows.items()}


def threshold_profile(x: torch.Tensor) -> torch.Tensor:
    """t[r] = max over rows of the r-th largest |x| of that row: float32 [in]. (NumPy's vectorised
    sort is several times faster than torch's on the CPU; the values are the same.)"""
    ascending = np.sort(x.abs().to(torch.float32).numpy(), axis=-1)
    return torch.from_numpy(ascending.max(axis=0)[::-1].copy())


def mean_abs(x: torch.Tensor) -> torch.Tensor:
    """Mean |x| per channel: float32 [in]; ranks channels for the static-selection baseline."""
    return x.abs().mean(dim=0).to(torch.float32)


@torch.no_grad()
def layer_sensitivity(
    args: ModelArgs, weights, windows: list[torch.Tensor], quantized_weight: Callable[[int, str, int], torch.Tensor]
) -> list[float]:
    """Per layer: KL(reference || layer at 3 bits) - KL(reference || layer at 4 bits), all other
    layers in full precision. `quantized_weight(layer, kind, bits)` gives the dequantized weight
    applied to x (AWQ's input scale folded in)."""
    ref_logp = [F.log_softmax(forward(args, weights, w), -1) for w in windows]
    ref = reference_linear(weights)

    def kl_with(layer: int, bits: int) -> float:
        w = {kind: quantized_weight(layer, kind, bits) for kind in ("qkv", "o", "gate_up", "down")}
        linear = lambda i, kind, x: x @ w[kind].T if i == layer else ref(i, kind, x)  # noqa: E731
        total, count = 0.0, 0
        for window, p in zip(windows, ref_logp):
            q = F.log_softmax(forward(args, weights, window, linear), -1)
            total += F.kl_div(q, p, log_target=True, reduction="sum").item()
            count += window.shape[0]
        return total / count

    return [kl_with(layer, 3) - kl_with(layer, 4) for layer in range(args.n_layers)]


def bits_per_layer(bits: float, sensitivity: list[float] | None, n_layers: int) -> list[int]:
    """3 or 4 everywhere, or for 3.5 the more sensitive half of the layers at 4 bits (ties: lower layer)."""
    if bits != 3.5:
        return [int(bits)] * n_layers
    assert sensitivity is not None, "3.5-bit needs the layer sensitivity"
    order = sorted(range(n_layers), key=lambda i: (-sensitivity[i], i))
    four = set(order[: n_layers // 2])
    return [4 if i in four else 3 for i in range(n_layers)]
