"""Per-layer latency model: how long a linear group takes, alone and with DecDEC's correction beside it.

A table of measurements on the current device (`decdec tune`), saved in the device profile
(scheduler/profile.py).
Pure Python: the predictions run anywhere; only the measurements need the GPU. The model is measured
rather than fitted because the pair's cost (SMs the correction takes from the GEMV, its fixed floor,
PCIe against HBM) differs by shape in ways a few-parameter formula misses.
"""

from __future__ import annotations

from dataclasses import dataclass


def weight_bytes(out: int, inp: int, bits: int, group_size: int = 128) -> float:
    """Bytes the base GEMV reads: packed codes plus fp16 scale and zero per group."""
    return out * inp * bits / 8 + out * -(-inp // group_size) * 4


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
