"""Selector op: which input channels' residuals to fetch at this step (docs/FORMATS.md, "Selection").

DecDEC corrects only the channels of largest |x|. Exact top-k is too slow inside the decode step,
so the kernel bins |x| into 32 buckets whose edges come from two thresholds calibrated offline, and
takes whole buckets from the top down. This module is the CPU reference of that rule (plus the
exact and static baselines); the batch simulation uses it, and the GPU kernel must match it.

Every function takes activations of shape [..., width] and returns int64 channel indices of shape
[..., n_selected(width, k_chunk)], chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from decdec.constants import CHUNK_SIZE, N_BUCKETS, chunk_ks


@dataclass(frozen=True)
class BucketBounds:
    """The bucket edges of one layer at one k_chunk, as float32 (the kernel gets the same four)."""

    a: np.float32  # upper threshold: |x| >= a is bucket 0
    b: np.float32  # lower threshold: [b, a) is split into buckets 1..15, [0, b) into 16..31
    hi_scale: np.float32  # 15 / (a - b)
    lo_scale: np.float32  # 16 / b


def bucket_bounds(thresholds: np.ndarray | torch.Tensor, k_chunk: int, chunk_size: int = CHUNK_SIZE) -> BucketBounds:
    """Edges from the calibrated profile t (t[r] = largest r-th biggest |x|): a = t[0], b = t[n-1]."""
    t = np.asarray(thresholds, dtype=np.float32)
    n = k_chunk * t.shape[-1] // chunk_size
    chunk_ks(t.shape[-1], k_chunk, chunk_size)  # validates k_chunk
    a = np.float32(t[0]) if n > 0 else np.float32(np.inf)
    b = np.float32(t[n - 1]) if n > 0 else np.float32(np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        hi_scale = np.float32(15) / np.float32(a - b)
        lo_scale = np.float32(16) / b
    return BucketBounds(a, b, hi_scale, lo_scale)


def bucket_ids(x: torch.Tensor, bounds: BucketBounds) -> torch.Tensor:
    """Bucket (0 = largest) of every |x|, computed in float32 exactly as the kernel does."""
    v = x.abs().to(torch.float32)
    f32 = lambda s: torch.tensor(s, dtype=torch.float32)  # noqa: E731 - keep scalars float32
    a, b, hi_scale, lo_scale = (f32(s) for s in (bounds.a, bounds.b, bounds.hi_scale, bounds.lo_scale))
    hi = torch.floor((a - v) * hi_scale).nan_to_num(nan=14.0).clamp(0, 14) + 1
    lo = torch.floor((b - v) * lo_scale).nan_to_num(nan=15.0).clamp(0, 15) + 16
    bucket = torch.where(v >= a, torch.zeros_like(v), torch.where(v >= b, hi, lo))
    bucket = torch.where(torch.isnan(v), torch.full_like(v, N_BUCKETS - 1), bucket)
    return bucket.to(torch.int64)


def _take_smallest(key: torch.Tensor, ks: list[int], chunk_size: int) -> torch.Tensor:
    """Per chunk, the indices of the k smallest keys (keys are unique), in ascending key order."""
    picked = []
    for c, k in enumerate(ks):
        start = c * chunk_size
        sub = key[..., start : start + chunk_size]
        picked.append(torch.topk(sub, k, dim=-1, largest=False, sorted=True).indices + start)
    return torch.cat(picked, dim=-1) if picked else key.new_zeros(key.shape[:-1] + (0,))


def select_bucket(x: torch.Tensor, k_chunk: int, bounds: BucketBounds, chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """The DecDEC rule: fill each chunk from the top bucket down, lowest index first in a tie."""
    width = x.shape[-1]
    ks = chunk_ks(width, k_chunk, chunk_size)
    local = torch.arange(width, device=x.device) % chunk_size
    key = bucket_ids(x, bounds) * chunk_size + local  # (bucket, index) as one sortable integer
    return _take_smallest(key, ks, chunk_size)


def select_exact(x: torch.Tensor, k_chunk: int, chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """Exact top-k of |x| per chunk; ties go to the lower index, NaN ranks last."""
    width = x.shape[-1]
    ks = chunk_ks(width, k_chunk, chunk_size)
    v = x.abs().to(torch.float32).nan_to_num(nan=-1.0)
    rank = torch.empty_like(v, dtype=torch.int64)
    for start in range(0, width, chunk_size):
        sub = v[..., start : start + chunk_size]
        order = torch.sort(-sub, dim=-1, stable=True).indices
        rank[..., start : start + chunk_size].scatter_(-1, order, torch.arange(sub.shape[-1]).expand_as(order))
    return _take_smallest(rank, ks, chunk_size)


def select_static(x: torch.Tensor, k_chunk: int, mean_abs: torch.Tensor, chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """The static baseline: per chunk, the channels of largest calibrated mean |x|, whatever x is."""
    fixed = select_exact(torch.as_tensor(mean_abs, dtype=torch.float32), k_chunk, chunk_size)
    return fixed.expand(x.shape[:-1] + fixed.shape[-1:])


def selection_mask(indices: torch.Tensor, width: int) -> torch.Tensor:
    """Float 0/1 mask [..., width] with ones at the selected channels."""
    mask = torch.zeros(indices.shape[:-1] + (width,), dtype=torch.float32, device=indices.device)
    return mask.scatter_(-1, indices, 1.0)
