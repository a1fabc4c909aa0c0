"""Per-layer latency model: how long a linear group takes, alone and with DecDEC's correction beside it.

Fitted from microbenchmarks on the current device and saved as a device profile (JSON). Pure
Python: the fit and the predictions run anywhere; only the measurements need the GPU.

    base(out, in, bits)   = base_fixed_us + weight_bytes / hbm_bytes_per_us
    corr(out, in, k, tb)  = corr_fixed_us + fetch_bytes / min(pcie_bytes_per_us, tb * per_tb_bytes_per_us)
    pair(...)             = max(base * (1 + steal * tb / n_sm), corr) + pair_fixed_us

The correction takes `tb` thread blocks' SMs away from the base GEMV (the `steal` term) and hides
behind it until its PCIe fetch is longer than the GEMV; bandwidths are measured, not constants
(DESIGN.md §6: HBM is ~60x faster than PCIe on the H100, ~12x on the paper's laptop GPU).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from decdec.constants import n_selected

TB_CHOICES = (1, 2, 4, 6, 8, 12, 16, 24, 32)  # thread blocks the analytic model may give a correction


@dataclass(frozen=True)
class DeviceProfile:
    device: str
    n_sm: int
    hbm_bytes_per_us: float  # measured HBM read rate of the base GEMV
    base_fixed_us: float
    pcie_bytes_per_us: float  # zero-copy ceiling
    per_tb_bytes_per_us: float  # zero-copy rate one thread block sustains
    corr_fixed_us: float
    steal: float  # fraction of an SM's share of the GEMV lost per correction block
    pair_fixed_us: float

    # The interface the tuner uses; MeasuredModel has the same three methods.
    def base_us(self, out: int, inp: int, bits: int) -> float:
        return predict_base_us(self, out, inp, bits)

    def pair_us(self, out: int, inp: int, bits: int, k_chunk: int, n_tb: int) -> float:
        return predict_pair_us(self, out, inp, bits, k_chunk, n_tb)

    def n_tb_choices(self, out: int, inp: int, bits: int) -> list[int]:
        return list(TB_CHOICES)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "DeviceProfile":
        return cls(**json.loads(Path(path).read_text()))


def weight_bytes(out: int, inp: int, bits: int, group_size: int = 128) -> float:
    """Bytes the base GEMV reads: packed codes plus fp16 scale and zero per group."""
    return out * inp * bits / 8 + out * -(-inp // group_size) * 4


def fetch_bytes(out: int, inp: int, k_chunk: int) -> float:
    """Bytes the correction reads over PCIe: one 4-bit residual row of `out` values per picked channel."""
    return n_selected(inp, k_chunk) * -(-out // 2)


def predict_base_us(p: DeviceProfile, out: int, inp: int, bits: int) -> float:
    return p.base_fixed_us + weight_bytes(out, inp, bits) / p.hbm_bytes_per_us


def predict_corr_us(p: DeviceProfile, out: int, inp: int, k_chunk: int, n_tb: int) -> float:
    rate = min(p.pcie_bytes_per_us, n_tb * p.per_tb_bytes_per_us)
    return p.corr_fixed_us + fetch_bytes(out, inp, k_chunk) / rate


def predict_pair_us(p: DeviceProfile, out: int, inp: int, bits: int, k_chunk: int, n_tb: int) -> float:
    base = predict_base_us(p, out, inp, bits)
    if k_chunk == 0:
        return base
    slowed = base * (1 + p.steal * n_tb / p.n_sm)
    return max(slowed, predict_corr_us(p, out, inp, k_chunk, n_tb)) + p.pair_fixed_us


def _line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope of y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - slope * mx, slope


def _fit_correction(rows: list[dict]) -> tuple[float, float, float]:
    """(fixed us, PCIe bytes/us, bytes/us per block): a line through the rows with the most blocks
    (PCIe-bound), then the median per-block rate of the block-bound rows."""
    if not rows:
        return 0.0, 1.0, 1.0
    most = max(r["n_tb"] for r in rows)
    top = [r for r in rows if r["n_tb"] == most]
    c0, slope = _line_fit([fetch_bytes(r["out"], r["in"], r["k_chunk"]) for r in top], [r["corr_us"] for r in top])
    c0 = max(c0, 0.0)
    pcie = 1 / slope if slope > 0 else max(fetch_bytes(r["out"], r["in"], r["k_chunk"]) / r["corr_us"] for r in top)
    per_block = sorted(
        fetch_bytes(r["out"], r["in"], r["k_chunk"]) / max(r["corr_us"] - c0, 1e-3) / r["n_tb"]
        for r in rows
        if fetch_bytes(r["out"], r["in"], r["k_chunk"]) / max(r["corr_us"] - c0, 1e-3) < 0.9 * pcie
    )
    return c0, pcie, per_block[len(per_block) // 2] if per_block else pcie / most


def fit_profile(device: str, n_sm: int, rows: list[dict]) -> DeviceProfile:
    """Fit from measured rows {out, in, bits, k_chunk, n_tb, base_us, corr_us, pair_us}
    (k_chunk 0 rows time the base alone; corr_us may be absent there)."""
    base_rows = {(r["out"], r["in"], r["bits"]): r["base_us"] for r in rows}
    a0, per_byte = _line_fit([weight_bytes(o, i, b) for o, i, b in base_rows], list(base_rows.values()))
    corr_rows = [r for r in rows if r["k_chunk"] > 0 and "corr_us" in r]
    c0, pcie, per_tb = _fit_correction(corr_rows)
    profile = DeviceProfile(device, n_sm, 1 / max(per_byte, 1e-12), max(a0, 0.0), pcie, per_tb, c0, 0.0, 0.0)
    pair_rows = [r for r in rows if r["k_chunk"] > 0 and "pair_us" in r]
    if not pair_rows:
        return profile
    best = None
    for steal in [s / 20 for s in range(41)]:  # 0 .. 2: a block costs up to two SMs' share
        trial = DeviceProfile(**{**asdict(profile), "steal": steal})
        resid = [r["pair_us"] - predict_pair_us(trial, r["out"], r["in"], r["bits"], r["k_chunk"], r["n_tb"])
                 for r in pair_rows]
        fixed = sorted(resid)[len(resid) // 2]
        err = sum((x - fixed) ** 2 for x in resid)
        if best is None or err < best[0]:
            best = (err, steal, fixed)
    return DeviceProfile(**{**asdict(profile), "steal": best[1], "pair_fixed_us": best[2]})


@dataclass
class MeasuredModel:
    """The latency model as measurements: per layer shape and bits, the base GEMV alone and the pair
    (base + correction concurrently) at each measured (k_chunk, n_tb); in between measured k_chunk
    values it interpolates linearly, and it never predicts outside what was measured (the tuner only
    picks measured n_tb and k_chunk within the measured range). `decdec tune` measures the model's
    own shapes, so every prediction the tuner needs is near a measurement."""

    device: str
    base: dict[str, float]  # "out x in x bits" -> µs
    pair: dict[str, list[list[float]]]  # "out x in x bits x n_tb" -> sorted [[k_chunk, µs], ...]

    @staticmethod
    def key(*parts) -> str:
        return "x".join(str(int(p)) for p in parts)

    @classmethod
    def from_rows(cls, device: str, rows: list[dict]) -> "MeasuredModel":
        """Rows {out, in, bits, k_chunk, n_tb, base_us, pair_us}; repeated points are averaged."""
        base: dict[str, list[float]] = {}
        pair: dict[str, dict[int, list[float]]] = {}
        for r in rows:
            base.setdefault(cls.key(r["out"], r["in"], r["bits"]), []).append(r["base_us"])
            if r["k_chunk"] > 0:
                pts = pair.setdefault(cls.key(r["out"], r["in"], r["bits"], r["n_tb"]), {})
                pts.setdefault(int(r["k_chunk"]), []).append(r["pair_us"])
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return cls(device, {k: mean(v) for k, v in base.items()},
                   {k: [[kc, mean(us)] for kc, us in sorted(v.items())] for k, v in pair.items()})

    def base_us(self, out: int, inp: int, bits: int) -> float:
        return self.base[self.key(out, inp, bits)]

    def measured(self, out: int, inp: int, bits: int) -> bool:
        """Whether this shape has a base time and at least one measured n_tb."""
        return self.key(out, inp, bits) in self.base and bool(self.n_tb_choices(out, inp, bits))

    def n_tb_choices(self, out: int, inp: int, bits: int) -> list[int]:
        prefix = self.key(out, inp, bits) + "x"
        return sorted(int(k[len(prefix):]) for k in self.pair if k.startswith(prefix))

    def k_range(self, out: int, inp: int, bits: int, n_tb: int) -> tuple[int, int]:
        pts = self.pair[self.key(out, inp, bits, n_tb)]
        return int(pts[0][0]), int(pts[-1][0])

    def pair_us(self, out: int, inp: int, bits: int, k_chunk: int, n_tb: int) -> float:
        if k_chunk == 0:
            return self.base_us(out, inp, bits)
        pts = self.pair[self.key(out, inp, bits, n_tb)]
        if not pts[0][0] <= k_chunk <= pts[-1][0]:
            return float("inf")  # not measured: never chosen
        for (k0, t0), (k1, t1) in zip(pts, pts[1:]):
            if k0 <= k_chunk <= k1:
                return t0 + (t1 - t0) * (k_chunk - k0) / (k1 - k0)
        return pts[0][1]  # a single measured k_chunk

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "MeasuredModel":
        return cls(**json.loads(Path(path).read_text()))
