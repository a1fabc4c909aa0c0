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

`quantize_robust` guards AWQ against its own over-fitting and aims it at what DecDEC leaves: it
scores AWQ's scale and RTN's by the error left after DecDEC's compensation at the planned
k_chunk, on calibration rows held back from the scale's statistics, keeps AWQ's unless RTN's is
clearly better there, and falls back to RTN where the result ends worse than RTN.

Every search scores its candidates with float32 matrix products on the CPU: one quantization and
one product per candidate, the corrected channels as a sparse product, the clipping search
against one Gram matrix per group of inputs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

import torch

# the packed layout lives with the ops that read it; pack/unpack are re-exported for the tests and bench
from decdec.ops.layout import WORD_BITS, _check_bits, _check_width, dequantize_codes, pack_codes, unpack_codes
from decdec.models.artifacts import StoredTensors
from decdec.constants import CHUNK_SIZE, GROUP_SIZE, chunk_ks

if TYPE_CHECKING:  # residual.py builds on this module
    from decdec.models.residual import ResidualTable

AWQ_SEARCH_ROWS = 512  # calibration rows for the alpha search (llm-awq also searches on 512 tokens)
AWQ_MIN_CHANNEL_SCALE = 1e-4  # floor on mean|x|^alpha: a channel that is always 0 gets a finite s
CLIP_GRID = 20  # clipping ratios tried per (row, group) ...
CLIP_MIN_RATIO = 0.5  # ... evenly from 1.0 (no clipping) down to this (half the range, as llm-awq)
HOLDOUT_FRACTION = 4  # quantize_robust validates its choice on the last quarter of the calibration rows
# quantize_robust leaves AWQ's scale for another only when that one's held-back error is lower by
# this fraction: the held-back rows are one stretch of text, and smaller wins there were noise
# that did not carry over to other text
FALLBACK_MARGIN = 0.15
# ... and by this one where the choice counts on DecDEC's compensation (k_chunk > 0): off the calibration
# text the selector finds fewer of the channels it finds on it (bench/selector_recall.py), so part of the
# error RTN leaves for the compensation stays, and a small win on the held-back rows does not carry over
COMPENSATED_MARGIN = 0.25


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


def _range(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each group of grouped weights [..., n_groups, group_size], widened to include 0."""
    return groups.amin(-1).clamp_(max=0.0), groups.amax(-1).clamp_(min=0.0)  # (torch.aminmax is slower)


def _grid(groups: torch.Tensor, bits: int, clip: torch.Tensor | None, w_range: tuple | None = None):
    """Codes (float), float16 scales and float zeros of grouped weights [..., n_groups, group_size];
    `w_range`, the groups' `_range` if known (a search quantizes one weight many times)."""
    max_code = 2**bits - 1
    w_min, w_max = w_range or _range(groups)
    if clip is not None:
        w_min = torch.maximum(w_min, -clip)
        w_max = torch.minimum(w_max, clip)
    scales = _round_up_to_half((w_max - w_min) / max_code)
    # an all-zero group has range 0: any scale represents it exactly, 1 avoids dividing by zero
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    scales_f = scales.float()
    zeros = torch.round(-w_min / scales_f).clamp(0, max_code)
    # in place: these passes over every weight are most of a search's elementwise work
    codes = torch.div(groups, scales_f[..., None]).round_().add_(zeros[..., None]).clamp_(0, max_code)
    return codes, scales, zeros


def _grouped_quant_dequant(
    groups: torch.Tensor, bits: int, clip: torch.Tensor | None = None, w_range: tuple | None = None
) -> torch.Tensor:
    """`quant_dequant` of weights already grouped by `_grouped`, in the same layout."""
    codes, scales, zeros = _grid(groups, bits, clip, w_range)
    return codes.sub_(zeros[..., None]).mul_(scales.float()[..., None])


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
    codes, scales, zeros = _grid(_grouped(weight.float(), group_size), bits, clip)
    return _ungrouped(codes, weight.shape[-1]).to(torch.uint8), scales, zeros.to(torch.float16)


def quant_dequant(
    weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE, clip: torch.Tensor | None = None
) -> torch.Tensor:
    """`dequantize_codes(*fake_quantize(...))`, bit for bit, without packing the codes into uint8
    and unpacking them again: the searches call it dozens of times per layer."""
    return _ungrouped(_grouped_quant_dequant(_grouped(weight.float(), group_size), bits, clip), weight.shape[-1])


# ---------------------------------------------------------------------------------------------
# The quantized linear group


def _expect(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")


@dataclass
class QuantizedLinear(StoredTensors):
    """One quantized linear group (FORMATS.md): `y = dequantize() @ (x * act_scale)`."""

    qweight: torch.Tensor  # int32 [out, in * bits / 32], packed codes
    scales: torch.Tensor  # float16 [out, n_groups]
    zeros: torch.Tensor  # float16 [out, n_groups], integer-valued zero points
    act_scale: torch.Tensor  # float32 [in]: 1/s of AWQ, ones for RTN
    bits: int
    group_size: int = GROUP_SIZE

    TENSOR_NAMES: ClassVar[tuple[str, ...]] = ("qweight", "scales", "zeros", "act_scale")  # bits, group_size: manifest
    WHAT: ClassVar[str] = "quantized weights"

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


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    _check_width(weight.shape[1])
    return weight.float()


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> QuantizedLinear:
    """Round-to-nearest: asymmetric min/max per (row, group), act_scale = ones."""
    weight = _check_weight(weight)
    return _Fit(weight, bits, group_size, torch.ones(weight.shape[1], dtype=torch.float32), None).pack()


# ---------------------------------------------------------------------------------------------
# AWQ


def _subsample_rows(x: torch.Tensor, max_rows: int) -> torch.Tensor:
    """At most `max_rows` rows of x, evenly strided: deterministic, and spread over all the text."""
    n = x.shape[0]
    if n <= max_rows:
        return x
    return x[torch.arange(max_rows) * n // max_rows]


def split_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(search rows, held-back rows): the last 1/HOLDOUT_FRACTION of the calibration rows is held
    back. It is contiguous text that the searches never saw, so a choice that only fits the search
    rows shows up there. With too few rows to spare, both are all of x."""
    held = x.shape[0] // HOLDOUT_FRACTION
    return (x[:-held], x[-held:]) if held else (x, x)


def awq_channel_scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-input-channel scale s = mean|x|^alpha, normalised so that max(s) * min(s) = 1
    (keeps W diag(s) in the same magnitude range as W)."""
    s = mean_abs.pow(alpha).clamp(min=AWQ_MIN_CHANNEL_SCALE)
    return s / (s.max() * s.min()).sqrt()


def _top_channels(x_seen: torch.Tensor, k_chunk: int) -> torch.Tensor:
    """int64 [N, n]: per row, the channels of largest |x~| that DecDEC corrects at k_chunk (exact
    top-k per 1024-chunk, which the bucket selector nearly matches), ascending. Ties are
    immaterial to an error estimate, so topk, not the selector's slower stable sort. The 4-bit
    residual is what DecDEC adds there; the other channels keep the weight's error."""
    width = x_seen.shape[-1]
    parts = [x_seen[:, start : start + CHUNK_SIZE].abs().topk(k, dim=-1, sorted=False).indices + start
             for start, k in zip(range(0, width, CHUNK_SIZE), chunk_ks(width, k_chunk)) if k]
    if not parts:
        return torch.empty(x_seen.shape[0], 0, dtype=torch.int64)
    return torch.cat(parts, -1).sort(-1).values


def corrected(x_seen: torch.Tensor, k_chunk: int) -> torch.Tensor:
    """x~ at the channels of `_top_channels`, zero elsewhere, as a sparse CSR [N, in] tensor:
    DecDEC corrects k_chunk of every 1024 channels, so a product with it costs a few per cent of
    the dense one."""
    top = _top_channels(x_seen, k_chunk)  # [N, n]
    rows = torch.arange(0, top.numel() + 1, max(1, top.shape[1]))
    with warnings.catch_warnings():  # torch calls all of CSR "beta"; a product with a dense matrix is all we use
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(rows, top.flatten(), x_seen.gather(1, top).flatten(), x_seen.shape)


def _search_alpha(
    weight: torch.Tensor, x: torch.Tensor, mean_abs: torch.Tensor, bits: int, group_size: int, n_grid: int
) -> float:
    """The alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid} whose act_scale = 1/s has the least output
    error ||(x * act_scale) (Q(W') - W')^T||^2 on rows x, with W' = W / act_scale. Every other
    alpha is tried first, then the two neighbours of the best (a coarse-to-fine search: it trusts
    the error to change little from one alpha to the next). alpha = 0, plain RTN, is always tried;
    ties keep the smaller alpha; a NaN loss (float16 scale overflow) is never chosen."""
    losses = torch.full((n_grid,), float("inf"))

    def score(a: int) -> None:
        act_scale = 1.0 / awq_channel_scale(mean_abs, a / n_grid)
        w_eff = weight / act_scale
        losses[a] = torch.nan_to_num(((x * act_scale) @ (quant_dequant(w_eff, bits, group_size) - w_eff).T).square().sum(),
                                     nan=float("inf"))

    for a in range(0, n_grid, 2):
        score(a)
    best = int(losses.argmin())
    for a in (best - 1, best + 1):
        if 0 <= a < n_grid and a % 2:
            score(a)
    return int(losses.argmin()) / n_grid


def _group_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group Gram matrices of the rows of x [N, in] -> [n_groups, group_size, group_size].

    The output error of one (row, group) is d^T G d with d the group's weight error, so the
    clipping search sees every calibration row at the cost of one Gram matrix; the Gram of
    x * act_scale is this one scaled on both sides, so one per layer serves every scale."""
    groups = _grouped(x, group_size).transpose(0, 1)  # [n_groups, N, group_size]
    return groups.transpose(1, 2) @ groups


def _scaled_gram(gram: torch.Tensor, act_scale: torch.Tensor) -> torch.Tensor:
    """The `_group_gram` of x * act_scale from that of x."""
    s = _grouped(act_scale, gram.shape[-1])  # [n_groups, group_size]
    return s[:, :, None] * gram * s[:, None, :]


def _group_output_error(d: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """sum over rows of x of (x_g . d_og)^2 for the weight error d, grouped and batched by group
    ([n_groups, out, group_size]) -> [n_groups, out]."""
    return (d @ gram).mul_(d).sum(-1)


def _search_clip(w_eff: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per (row, group) clipping bound max|w| * ratio, ratio on a grid of CLIP_GRID in
    [CLIP_MIN_RATIO, 1], minimising the group's output error (gram: `_group_gram` of the rows that
    w_eff sees). Every ratio is tried: a (row, group)'s error jumps with the rounding from one
    ratio to the next, so a minimum can sit between the points of a coarser grid. Returns clip
    [out, n_groups]; ties keep the least clipping."""
    # one layout for every ratio, batched by group as the Gram matrices are; the range is the same for all
    groups = _grouped(w_eff, group_size).transpose(0, 1).contiguous()  # [n_groups, out, group_size]
    w_range, max_abs = _range(groups), groups.abs().amax(-1)  # [n_groups, out]
    ratios = torch.linspace(1.0, CLIP_MIN_RATIO, CLIP_GRID)
    errors = [
        _group_output_error(_grouped_quant_dequant(groups, bits, max_abs * r, w_range).sub_(groups), gram)
        for r in ratios.tolist()
    ]
    best = torch.stack(errors).argmin(0)  # first minimum: the largest ratio among equals
    return (max_abs * ratios[best]).T


def _check_awq(weight: torch.Tensor, calib_x: torch.Tensor, bits: int, n_grid: int):
    """(weight, calibration rows x [N, in], mean|x| per channel), float32, or a ValueError."""
    weight = _check_weight(weight)
    in_features = weight.shape[1]
    x = calib_x.reshape(-1, calib_x.shape[-1]).float()
    if x.shape[1] != in_features or x.shape[0] == 0:
        raise ValueError(f"calib_x must be [N >= 1, {in_features}], got shape {tuple(calib_x.shape)}")
    if n_grid < 1:
        raise ValueError(f"n_grid must be >= 1, got {n_grid}")
    _check_bits(bits)
    return weight, x, x.abs().mean(0)


@dataclass
class _Fit:
    """One candidate quantization of `weight` before packing: the AWQ scale (1/s) and the clipping
    bounds. Its dequantization and residual table are kept once computed: the table that
    `quantize_robust` scores its result with is the one it hands on to be stored."""

    weight: torch.Tensor  # float32 [out, in]
    bits: int
    group_size: int
    act_scale: torch.Tensor  # float32 [in]
    clip: torch.Tensor | None  # [out, n_groups], None: the full range

    @cached_property
    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', deq(Q(W'))): the weight it quantizes and its dequantized codes, as `pack` stores them."""
        w_eff = self.weight / self.act_scale  # exactly what residual.effective_weight recomputes
        return w_eff, quant_dequant(w_eff, self.bits, self.group_size, self.clip)

    @cached_property
    def table(self) -> ResidualTable:
        """The 4-bit residual table of W' - deq(Q(W')): what `residual.build_residual` makes of `pack()`."""
        from decdec.models.residual import residual_table  # residual.py builds on this module

        w_eff, deq = self.dequantized
        return residual_table(w_eff - deq)

    def pack(self) -> QuantizedLinear:
        codes, scales, zeros = fake_quantize(self.weight / self.act_scale, self.bits, self.group_size, self.clip)
        return QuantizedLinear(pack_codes(codes, self.bits), scales, zeros, self.act_scale, self.bits, self.group_size)


def _fit_awq(
    weight: torch.Tensor, mean_abs: torch.Tensor, gram: torch.Tensor | None, alpha: float, clip: bool, bits: int,
    group_size: int,
) -> _Fit:
    """The scale of `alpha` from mean|x| and, if asked, the clipping searched against `gram`."""
    act_scale = 1.0 / awq_channel_scale(mean_abs, alpha)
    bounds = _search_clip(weight / act_scale, _scaled_gram(gram, act_scale), bits, group_size) if clip else None
    return _Fit(weight, bits, group_size, act_scale, bounds)


def quantize_awq(weight: torch.Tensor, calib_x: torch.Tensor, bits: int, group_size: int = GROUP_SIZE,
                 n_grid: int = 20) -> QuantizedLinear:
    """AWQ: search the per-input-channel scale, then the per-group clipping, and quantize W diag(s).

    `weight` [out, in] may be several projections that share an input (q, k, v or gate, up)
    stacked by rows: they get one s, as the layer multiplies x by one act_scale.
    `calib_x` [..., in] are the layer's input activations on calibration text. The alpha search
    uses at most AWQ_SEARCH_ROWS evenly strided rows; mean|x| and the clipping search use all.
    """
    weight, x, mean_abs = _check_awq(weight, calib_x, bits, n_grid)
    alpha = _search_alpha(weight, _subsample_rows(x, AWQ_SEARCH_ROWS), mean_abs, bits, group_size, n_grid)
    return _fit_awq(weight, mean_abs, _group_gram(x, group_size), alpha, True, bits, group_size).pack()


def compensated_error(fit: _Fit, x: torch.Tensor, k_chunk: int) -> float:
    """Squared output error of `fit` on rows x [N, in] after DecDEC's compensation at k_chunk with
    its real 4-bit residual table (`fit.table`): clipping inflates the residual's range and so its
    4-bit error, which an exact residual cannot see."""
    w_eff, deq = fit.dequantized
    xs = x * fit.act_scale
    out = xs @ (deq - w_eff).T
    if k_chunk:  # row i of the table is what a pick of channel i adds
        out = out + torch.sparse.mm(corrected(xs, k_chunk), fit.table.dequantize_rows(torch.arange(w_eff.shape[1])))
    return out.square().sum().item()


def _held_back_alpha(
    weight: torch.Tensor, x: torch.Tensor, mean_abs: torch.Tensor, k_chunk: int, bits: int, group_size: int,
    n_grid: int,
) -> tuple[float, float]:
    """(the alpha quantize_robust fits, RTN's error on the held-back rows).

    AWQ's alpha (searched on all the rows x, whose mean|x| is `mean_abs`, as `quantize_awq` searches)
    and RTN's (0) are scaled by mean|x| of the search rows of `split_rows` and scored after DecDEC's
    compensation at k_chunk with the real 4-bit residual table on its held-back rows, without
    clipping; AWQ's is kept unless RTN's beats it by FALLBACK_MARGIN (COMPENSATED_MARGIN where
    k_chunk > 0). The table, not an exact residual: an unscaled weight's residual can have so wide
    a range that its 4-bit table corrects far less than an exact residual would."""
    search, held = split_rows(x)
    awq = _search_alpha(weight, _subsample_rows(x, AWQ_SEARCH_ROWS), mean_abs, bits, group_size, n_grid)
    search_mean_abs = search.abs().mean(0)
    awq_error, rtn_error = (compensated_error(_fit_awq(weight, search_mean_abs, None, a, False, bits, group_size),
                                              held, k_chunk) for a in (awq, 0.0))
    margin = COMPENSATED_MARGIN if k_chunk else FALLBACK_MARGIN
    return (0.0 if rtn_error < awq_error * (1 - margin) else awq), rtn_error


def quantize_robust(weight: torch.Tensor, calib_x: torch.Tensor, bits: int, group_size: int = GROUP_SIZE,
                    k_chunk: int = 0, n_grid: int = 20) -> tuple[QuantizedLinear, ResidualTable | None]:
    """AWQ that never ends worse than RTN off its fitting rows, and that knows DecDEC is coming.

    The scale comes from `_held_back_alpha`: AWQ's, unless RTN's is clearly better on held-back
    rows once DecDEC has compensated at `k_chunk` (AWQ protects the salient channels, which
    DecDEC may correct anyway). It is then fitted on all the rows with clipping searched plainly
    (clipping aimed past the corrected channels inflates the residual: see `compensated_error`),
    exactly as `quantize_awq` fits AWQ's scale; if that ends worse than RTN on the held-back rows,
    RTN is kept. Returns the quantized group and, where that check built it (k_chunk > 0 and AWQ's
    fit kept), its residual table, which a caller then need not build again.
    """
    weight, x, mean_abs = _check_awq(weight, calib_x, bits, n_grid)
    alpha, rtn_error = _held_back_alpha(weight, x, mean_abs, k_chunk, bits, group_size, n_grid)
    fit = _fit_awq(weight, mean_abs, _group_gram(x, group_size), alpha, True, bits, group_size)
    if compensated_error(fit, split_rows(x)[1], k_chunk) > rtn_error:
        return quantize_rtn(weight, bits, group_size), None
    return fit.pack(), fit.table if k_chunk else None
