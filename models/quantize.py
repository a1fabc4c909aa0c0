"""Weight quantization of one linear group: round-to-nearest (RTN) and AWQ, 3 or 4 bits, group 128.

The packed layout, dtypes and the meaning of every tensor are fixed by docs/FORMATS.md
("Quantized linear group"); this module is the only place that writes them. Everything runs on
the CPU in float32 and is deterministic: the same weight and calibration give the same tensors.

AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization", MLSys 2024) in two searches:
1. a per-input-channel scale `s = mean|x|^alpha` (normalised), `alpha` on a grid, choosing the one
   that minimises the layer's output error `||Q(W diag(s)) (x / s) - W x||^2` on calibration rows;
2. a per-(output row, group) clipping ratio of the weight range, choosing the one that minimises
   that group's share of the output error.
The layer then computes `y = deq(Q) @ (x * act_scale)` with `act_scale = 1 / s`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from decdec.ops.layout import (  # noqa: F401 - the packed layout lives with the ops that read it
    SUPPORTED_BITS,
    WORD_BITS,
    _check_bits,
    _check_width,
    dequantize_codes,
    pack_codes,
    unpack_codes,
)
from decdec.errors import ArtifactError

GROUP_SIZE = 128  # inputs sharing one scale/zero (FORMATS.md; AWQ's and GPTQ's usual choice)

AWQ_SEARCH_ROWS = 512  # calibration rows for the alpha search (llm-awq also searches on 512 tokens)
AWQ_MIN_CHANNEL_SCALE = 1e-4  # floor on mean|x|^alpha: a channel that is always 0 gets a finite s
CLIP_GRID = 20  # clipping ratios tried per (row, group) ...
CLIP_MIN_RATIO = 0.5  # ... evenly from 1.0 (no clipping) down to this (half the range, as llm-awq)


# ---------------------------------------------------------------------------------------------
# Packed layout (FORMATS.md)


# ---------------------------------------------------------------------------------------------
# Group-wise asymmetric quantization


def n_groups(in_features: int, group_size: int) -> int:
    """Number of quantization groups along the input (the last one may be partial)."""
    return -(-in_features // group_size)


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., in] -> [..., n_groups, group_size], zero-padding a partial last group.

    Zero padding is neutral everywhere it is used: every group's range includes 0 anyway, and a
    zero weight (or activation) adds nothing to an output error.
    """
    in_features = t.shape[-1]
    pad = n_groups(in_features, group_size) * group_size - in_features
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(*t.shape[:-1], -1, group_size)


def _ungrouped(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `_grouped`: [..., n_groups, group_size] -> [..., in], dropping the padding."""
    return t.reshape(*t.shape[:-2], -1)[..., :in_features]


def _round_up_to_half(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the smallest float16 >= x, so a scale never shrinks when it is stored.

    A stored scale below (max - min) / max_code would push the group's extremes out of the code
    range; rounding up keeps every element within scale / 2 of its dequantized value.
    """
    half = x.to(torch.float16)
    up = torch.nextafter(half, torch.full_like(half, float("inf")))
    return torch.where(half.float() < x, up, half)


def fake_quantize(
    weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization per (row, group) of `weight` [out, in].

    `clip` [out, n_groups], optional, bounds each group's range to [-clip, clip] (AWQ's clipping);
    a weight beyond the range takes the nearest end code of the group's grid.
    Each group's range is widened to include 0, so the zero point is an exact code (no clamping),
    0 dequantizes to exactly 0, and an all-positive or all-negative group keeps its error bound.
    Returns codes uint8 [out, in] in [0, 2**bits - 1], scales float16 [out, n_groups] and integer
    zeros float16 [out, n_groups]; `dequantize_codes` inverts them. Codes are computed with the
    float16 scales, so the error bound |deq - w| <= scale / 2 holds for what is stored.
    """
    _check_bits(bits)
    max_code = 2**bits - 1
    groups = _grouped(weight.float(), group_size)  # [out, n_groups, group_size]
    w_min = groups.amin(-1).clamp(max=0.0)
    w_max = groups.amax(-1).clamp(min=0.0)
    if clip is not None:
        w_min = torch.maximum(w_min, -clip)
        w_max = torch.minimum(w_max, clip)
    scales = _round_up_to_half((w_max - w_min) / max_code)
    # an all-zero group has range 0: any scale represents it exactly, 1 avoids dividing by zero
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    scales_f = scales.float()
    zeros = torch.round(-w_min / scales_f).clamp(0, max_code)
    codes = torch.round(groups / scales_f[..., None]) + zeros[..., None]
    codes = codes.clamp(0, max_code).to(torch.uint8)
    return _ungrouped(codes, weight.shape[-1]), scales, zeros.to(torch.float16)


# ---------------------------------------------------------------------------------------------
# The quantized linear group


def _expect(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(
            f"{name} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}"
        )


@dataclass
class QuantizedLinear:
    """One quantized linear group (FORMATS.md): `y = dequantize() @ (x * act_scale)`."""

    qweight: torch.Tensor  # int32 [out, in * bits / 32], packed codes
    scales: torch.Tensor  # float16 [out, n_groups]
    zeros: torch.Tensor  # float16 [out, n_groups], integer-valued zero points
    act_scale: torch.Tensor  # float32 [in]: 1/s of AWQ, ones for RTN
    bits: int
    group_size: int = GROUP_SIZE

    TENSOR_NAMES: ClassVar[tuple[str, ...]] = ("qweight", "scales", "zeros", "act_scale")

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if self.act_scale.dim() != 1 or self.qweight.dim() != 2:
            raise ValueError("act_scale must be 1-D [in] and qweight 2-D [out, words]")
        _check_width(self.in_features)
        out, groups = self.out_features, n_groups(self.in_features, self.group_size)
        words = self.in_features * self.bits // WORD_BITS
        _expect("qweight", self.qweight, torch.int32, (out, words))
        _expect("scales", self.scales, torch.float16, (out, groups))
        _expect("zeros", self.zeros, torch.float16, (out, groups))
        _expect("act_scale", self.act_scale, torch.float32, (self.in_features,))
        if not torch.isfinite(self.scales).all():
            raise ValueError("scales must be finite: the weight range does not fit float16 scales")

    @property
    def in_features(self) -> int:
        return self.act_scale.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def codes(self) -> torch.Tensor:
        """The unpacked codes, uint8 [out, in]."""
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]: the weight applied to `x * act_scale`, i.e. deq(Q) of FORMATS.md."""
        return dequantize_codes(self.codes(), self.scales, self.zeros, self.group_size)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors for a safetensors file, named `{prefix}.qweight` etc. (bits/group_size go in
        the manifest: the reader passes them back to `from_tensors`)."""
        return {f"{prefix}.{name}": getattr(self, name).contiguous() for name in self.TENSOR_NAMES}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], prefix: str, bits: int, group_size: int = GROUP_SIZE
    ) -> "QuantizedLinear":
        """Inverse of `to_tensors`; raises ArtifactError on a missing or ill-shaped tensor."""
        missing = [f"{prefix}.{n}" for n in cls.TENSOR_NAMES if f"{prefix}.{n}" not in tensors]
        if missing:
            raise ArtifactError(f"quantized weights lack tensor(s) {missing}")
        fields = {n: tensors[f"{prefix}.{n}"] for n in cls.TENSOR_NAMES}
        try:
            return cls(**fields, bits=bits, group_size=group_size)
        except ValueError as err:
            raise ArtifactError(f"quantized weights '{prefix}': {err}") from err


def _from_fake(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    act_scale: torch.Tensor,
    bits: int,
    group_size: int,
) -> QuantizedLinear:
    """Pack the output of `fake_quantize` into a QuantizedLinear."""
    return QuantizedLinear(pack_codes(codes, bits), scales, zeros, act_scale, bits, group_size)


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    _check_width(weight.shape[1])
    return weight.float()


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> QuantizedLinear:
    """Round-to-nearest: asymmetric min/max per (row, group), act_scale = ones."""
    weight = _check_weight(weight)
    act_scale = torch.ones(weight.shape[1], dtype=torch.float32)
    return _from_fake(*fake_quantize(weight, bits, group_size), act_scale, bits, group_size)


# ---------------------------------------------------------------------------------------------
# AWQ


def _subsample_rows(x: torch.Tensor, max_rows: int) -> torch.Tensor:
    """At most `max_rows` rows of x, evenly strided: deterministic, and spread over all the text."""
    n = x.shape[0]
    if n <= max_rows:
        return x
    return x[torch.arange(max_rows) * n // max_rows]


def awq_channel_scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-input-channel scale s = mean|x|^alpha, normalised so that max(s) * min(s) = 1
    (keeps W diag(s) in the same magnitude range as W)."""
    s = mean_abs.pow(alpha).clamp(min=AWQ_MIN_CHANNEL_SCALE)
    return s / (s.max() * s.min()).sqrt()


def _effective_error(
    weight: torch.Tensor, act_scale: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """deq(Q(W diag(s))) diag(1/s) - W: the quantization error as seen by the unscaled x."""
    w_eff = weight / act_scale
    deq = dequantize_codes(*fake_quantize(w_eff, bits, group_size), group_size)
    return deq * act_scale - weight


def _search_act_scale(
    weight: torch.Tensor,
    x: torch.Tensor,
    mean_abs: torch.Tensor,
    bits: int,
    group_size: int,
    n_grid: int,
) -> torch.Tensor:
    """act_scale = 1/s for the alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid} with the least
    output error ||(Q(W s)/s - W) x||^2 on rows x. alpha = 0 is plain RTN, so AWQ never does worse
    on x; ties keep the smaller alpha."""
    best_loss, best = float("inf"), torch.ones_like(mean_abs)
    for k in range(n_grid):
        act_scale = 1.0 / awq_channel_scale(mean_abs, k / n_grid)
        diff = _effective_error(weight, act_scale, bits, group_size)  # [out, in]
        loss = (x @ diff.T).square().sum().item()
        if loss < best_loss:  # a NaN loss (float16 scale overflow) is never chosen
            best_loss, best = loss, act_scale
    return best


def _group_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group Gram matrices of the rows of x [N, in] -> [n_groups, group_size, group_size].

    The output error of one (row, group) is d^T G d with d the group's weight error, so the
    clipping search sees every calibration row at the cost of one Gram matrix."""
    groups = _grouped(x, group_size)  # [N, n_groups, group_size]
    return torch.einsum("ngi,ngj->gij", groups, groups)


def _group_output_error(w_err: torch.Tensor, gram: torch.Tensor, group_size: int) -> torch.Tensor:
    """sum over rows of x of (x_g . d_og)^2 for weight error d [out, in] -> [out, n_groups]."""
    d = _grouped(w_err, group_size)  # [out, n_groups, group_size]
    return (torch.einsum("ogi,gij->ogj", d, gram) * d).sum(-1)


def _search_clip(
    w_eff: torch.Tensor, x_eff: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Per (row, group) clipping bound max|w| * ratio, ratio in [CLIP_MIN_RATIO, 1], minimising the
    group's output error on x_eff. Returns clip [out, n_groups]; ties keep the least clipping."""
    gram = _group_gram(x_eff, group_size)
    max_abs = _grouped(w_eff, group_size).abs().amax(-1)  # [out, n_groups]
    ratios = torch.linspace(1.0, CLIP_MIN_RATIO, CLIP_GRID)
    errors = []
    for ratio in ratios.tolist():
        deq = dequantize_codes(*fake_quantize(w_eff, bits, group_size, max_abs * ratio), group_size)
        errors.append(_group_output_error(deq - w_eff, gram, group_size))
    best = torch.stack(errors).argmin(0)  # first minimum: the largest ratio among equals
    return max_abs * ratios[best]


def quantize_awq(
    weight: torch.Tensor,
    calib_x: torch.Tensor,
    bits: int,
    group_size: int = GROUP_SIZE,
    n_grid: int = 20,
) -> QuantizedLinear:
    """AWQ: search the per-input-channel scale, then the per-group clipping, and quantize W diag(s).

    `weight` [out, in] may be several projections that share an input (q, k, v or gate, up)
    stacked by rows: they get one s, as the layer multiplies x by one act_scale.
    `calib_x` [..., in] are the layer's input activations on calibration text. The alpha search
    uses at most AWQ_SEARCH_ROWS evenly strided rows; mean|x| and the clipping search use all.
    """
    weight = _check_weight(weight)
    in_features = weight.shape[1]
    x = calib_x.reshape(-1, calib_x.shape[-1]).float()
    if x.shape[1] != in_features or x.shape[0] == 0:
        raise ValueError(
            f"calib_x must be [N >= 1, {in_features}], got shape {tuple(calib_x.shape)}"
        )
    if n_grid < 1:
        raise ValueError(f"n_grid must be >= 1, got {n_grid}")
    _check_bits(bits)
    mean_abs = x.abs().mean(0)
    x_search = _subsample_rows(x, AWQ_SEARCH_ROWS)
    act_scale = _search_act_scale(weight, x_search, mean_abs, bits, group_size, n_grid)
    w_eff = weight / act_scale  # exactly what residual.effective_weight recomputes
    clip = _search_clip(w_eff, x * act_scale, bits, group_size)
    return _from_fake(*fake_quantize(w_eff, bits, group_size, clip), act_scale, bits, group_size)
