"""The selector reference against a literal, scalar re-statement of the bucket rule."""

import numpy as np
import pytest
import torch

from decdec.constants import n_selected
from decdec.ops import selector
from decdec.errors import ConfigError


def literal_bucket_select(x: np.ndarray, k_chunk: int, t: np.ndarray, chunk: int = 1024) -> list[int]:
    """The rule as the spec words it: scalar float32 maths, buckets filled top-down, index order."""
    n = k_chunk * len(x) // chunk
    if n == 0:
        return []
    a, b = np.float32(t[0]), np.float32(t[n - 1])
    with np.errstate(all="ignore"):
        hi_scale, lo_scale = np.float32(15) / np.float32(a - b), np.float32(16) / b
    picked = []
    for start in range(0, len(x), chunk):
        width = min(chunk, len(x) - start)
        k = k_chunk * width // chunk
        buckets = [[] for _ in range(32)]
        for i in range(start, start + width):
            v = np.float32(abs(x[i]))
            with np.errstate(all="ignore"):
                if np.isnan(v):
                    j = 31
                elif v >= a:
                    j = 0
                elif v >= b:
                    j = 1 + min(14, max(0, int(np.floor(np.float32(a - v) * hi_scale))))
                else:
                    j = 16 + min(15, max(0, int(np.floor(np.float32(b - v) * lo_scale))))
            buckets[j].append(i)
        taken = []
        for bucket in buckets:
            taken += bucket[: k - len(taken)]
        picked += taken
    return picked


def calibrated_profile(samples: np.ndarray) -> np.ndarray:
    """t[r] = the largest r-th biggest |x| over the samples (the paper's calibration)."""
    return np.sort(np.abs(samples), axis=-1)[:, ::-1].max(axis=0).astype(np.float32)


@pytest.mark.parametrize("width", [576, 640, 1024, 1536, 3000])
@pytest.mark.parametrize("k_chunk", [0, 1, 8, 37, 64, 1024])
def test_bucket_select_matches_literal_rule(width, k_chunk):
    rng = np.random.default_rng(1000 * width + k_chunk)
    calib = rng.standard_t(df=3, size=(16, width)).astype(np.float32)
    t = calibrated_profile(calib)
    x = rng.standard_t(df=3, size=(4, width)).astype(np.float32)
    x[0, rng.integers(0, width, 5)] = np.nan
    x[1, rng.integers(0, width, 3)] = np.inf
    x[2, rng.integers(0, width, 3)] = -np.inf
    x[3, : width // 2] = x[3, width // 2 : 2 * (width // 2)]  # exact ties between channels
    bounds = selector.bucket_bounds(t, k_chunk)
    got = selector.select_bucket(torch.from_numpy(x), k_chunk, bounds)
    assert got.shape == (4, n_selected(width, k_chunk))
    for row in range(4):
        assert sorted(got[row].tolist()) == sorted(literal_bucket_select(x[row], k_chunk, t))
        assert got[row].min() >= 0 if got.shape[-1] else True
        assert len(set(got[row].tolist())) == got.shape[-1]  # no channel twice


def test_partial_chunk_counts():
    assert selector.chunk_ks(640, 8) == [5]
    assert selector.chunk_ks(1536, 8) == [8, 4]
    assert selector.chunk_ks(3000, 1024) == [1024, 1024, 952]
    assert n_selected(4096, 16) == 64


def test_exact_select_is_top_k_per_chunk_lowest_index_on_ties():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 1500)).astype(np.float32)
    x[0, 10] = x[0, 20] = 50.0  # a tie at the top
    x[1, 5] = np.nan
    got = selector.select_exact(torch.from_numpy(x), 16)
    for row in range(3):
        for start, k in ((0, 16), (1024, 16 * 476 // 1024)):
            v = np.nan_to_num(np.abs(x[row, start : start + 1024]), nan=-1)
            expect = np.argsort(-v, kind="stable")[:k] + start
            assert set(got[row].tolist()) >= set(expect.tolist())
    assert got[0, 0] == 10 and got[0, 1] == 20
    assert 5 not in got[1].tolist()


def test_bucket_select_recalls_most_of_exact_top_k():
    """With thresholds calibrated on the same distribution, buckets pick mostly the true top-k."""
    rng = np.random.default_rng(3)
    scale = np.exp(rng.standard_normal(2048)).astype(np.float32)  # channels of different magnitude
    t = calibrated_profile(rng.standard_normal((256, 2048)).astype(np.float32) * scale)
    x = torch.from_numpy(rng.standard_normal((64, 2048)).astype(np.float32) * scale)
    got = selector.select_bucket(x, 32, selector.bucket_bounds(t, 32))
    exact = selector.select_exact(x, 32)
    recall = np.mean([len(set(g.tolist()) & set(e.tolist())) / 64 for g, e in zip(got, exact)])
    assert recall > 0.6


def test_static_select_ignores_x():
    mean_abs = torch.arange(700, dtype=torch.float32)
    x = torch.randn(5, 700)
    got = selector.select_static(x, 64, mean_abs)
    assert got.shape == (5, 43)
    assert set(got[0].tolist()) == set(range(657, 700))
    assert torch.equal(got[0], got[4])


def test_mask_marks_selected_channels():
    idx = torch.tensor([[0, 3], [1, 2]])
    assert selector.selection_mask(idx, 4).tolist() == [[1, 0, 0, 1], [0, 1, 1, 0]]


@pytest.mark.parametrize("k_chunk", [-1, 1025])
def test_k_chunk_out_of_range_is_a_clear_error(k_chunk):
    with pytest.raises(ConfigError, match=r"k_chunk = .* out of range: allowed 0 \.\. 1024"):
        selector.chunk_ks(2048, k_chunk)
