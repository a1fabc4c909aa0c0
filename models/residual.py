"""The residual table of one linear group: R = W' - deq(Q), quantized to 4 bits for the CPU side.

Layout and meaning are fixed by docs/FORMATS.md ("Residual table"). The table is stored transposed,
one row per *input* channel, because the decode-time kernel fetches the residuals of the few input
channels it picks: each pick is then one contiguous read of ceil(out / 2) bytes over PCIe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from decdec.models.artifacts import StoredTensors
from decdec.models.quantize import QuantizedLinear
from decdec.ops.layout import NIBBLE_OFFSET, pack_rows, unpack_rows  # noqa: F401 - FORMATS.md layouts

RESIDUAL_MAX_CODE = 7  # symmetric 4-bit codes in [-7, 7]: 0 is exact and -8 is left unused
SCALE_GRID = 32  # candidate scales max|R_row| / 7 * c / 32, c = 1..32 (DecDEC's grid search)
SEARCH_BLOCK = 1 << 19  # elements of one batch of the scale search


@dataclass
class ResidualTable(StoredTensors):
    """4-bit residual of one linear group: R_hat[o, i] = (nibble(i, o) - 8) * scales[o]."""

    rows: torch.Tensor  # uint8 [in, ceil(out / 2)], row i = input channel i
    scales: torch.Tensor  # float16 [out], per output channel

    TENSOR_NAMES: ClassVar[tuple[str, ...]] = ("rows", "scales")
    WHAT: ClassVar[str] = "residual table"

    def __post_init__(self) -> None:
        if self.scales.dtype != torch.float16 or self.scales.dim() != 1:
            raise ValueError(f"scales must be float16 [out], got {self.scales.dtype} {list(self.scales.shape)}")
        packed = -(-self.out_features // 2)
        if self.rows.dtype != torch.uint8 or self.rows.dim() != 2 or self.rows.shape[1] != packed:
            raise ValueError(f"rows must be uint8 [in, {packed}] for {self.out_features} outputs, "
                             f"got {self.rows.dtype} {list(self.rows.shape)}")

    @property
    def out_features(self) -> int:
        return self.scales.shape[0]

    def dequantize_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 [len(idx), out]: the residual rows of input channels `idx`, dequantized —
        what the kernel's fetch + dequant step produces for the channels it picked."""
        return unpack_rows(self.rows[idx], self.out_features) * self.scales.float()

    def dequantize(self) -> torch.Tensor:
        """R_hat, float32 [out, in]."""
        return self.dequantize_rows(torch.arange(self.rows.shape[0])).T.contiguous()


def effective_weight(weight: torch.Tensor, qlinear: QuantizedLinear) -> torch.Tensor:
    """W' = W diag(s) = W / act_scale column-wise: the weight that `qlinear` quantized (float32)."""
    return weight.float() / qlinear.act_scale


def _quantize_rows(residual: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Symmetric codes in [-7, 7] of residual [..., in] at scales [..., 1] (0 scale: 0)."""
    ratio = residual / torch.where(scales > 0, scales, torch.inf)
    return ratio.round_().clamp_(-RESIDUAL_MAX_CODE, RESIDUAL_MAX_CODE)


def search_row_scales(residual: torch.Tensor) -> torch.Tensor:
    """Per output row, the float16 scale among max|R_row| / 7 * c / 32 (c = 1..32) with the least
    squared error; ties go to the larger scale; an all-zero row gets 0. The error is measured with
    each candidate rounded to float16, i.e. with the scale that is actually stored.

    All 32 candidates are tried at once on a block of rows ([rows, 32, in], about SEARCH_BLOCK
    elements: it stays in cache, where one pass per candidate over the whole matrix would not),
    in place where it can be: this search is most of the cost of a residual table."""
    out, width = residual.shape
    base = residual.abs().amax(1) / RESIDUAL_MAX_CODE  # [out], the plain max/7 scale
    grid = torch.arange(1, SCALE_GRID + 1) / SCALE_GRID
    candidates = (base[:, None] * grid).to(torch.float16)  # [out, 32]
    best = torch.empty(out, dtype=torch.float16)
    step = max(1, SEARCH_BLOCK // (SCALE_GRID * width))
    for start in range(0, out, step):
        s = candidates[start:start + step]
        sf, r = s.float()[:, :, None], residual[start:start + step, None, :]
        err = _quantize_rows(r, sf).mul_(sf).sub_(r)
        err = torch.linalg.vecdot(err, err)  # [rows, 32]
        last_min = SCALE_GRID - 1 - err.flip(1).argmin(1)  # argmin takes the first: a tie goes to the larger c
        best[start:start + step] = s.gather(1, last_min[:, None])[:, 0]
    return best


def build_residual(weight_eff: torch.Tensor, qlinear: QuantizedLinear) -> ResidualTable:
    """Quantize R = weight_eff - deq(Q) into a table (weight_eff from `effective_weight`)."""
    deq = qlinear.dequantize()
    if tuple(weight_eff.shape) != tuple(deq.shape):
        raise ValueError(
            f"weight_eff {list(weight_eff.shape)} does not match "
            f"the quantized weight {list(deq.shape)}"
        )
    return residual_table(weight_eff.float() - deq)


def residual_table(residual: torch.Tensor) -> ResidualTable:
    """The 4-bit table of residual [out, in]."""
    scales = search_row_scales(residual)
    codes = _quantize_rows(residual, scales.float()[:, None])
    return ResidualTable(pack_rows(codes), scales)
