"""Tuner: k_chunk and n_tb per linear-group shape, to compensate as much as a target slowdown allows.

The target is for the whole decode step. Linear groups are only part of a step, so the budget of
extra time, target * step_us, is spread as one uniform slowdown over the groups' base time; each
shape then takes the largest k_chunk whose best n_tb keeps its predicted slowdown under that bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import ConfigError
from scheduler.latency import DeviceProfile, predict_base_us, predict_pair_us

K_CHOICES = tuple(range(1, 17)) + tuple(range(20, 129, 4)) + tuple(range(160, 1025, 32))
TB_CHOICES = (1, 2, 4, 6, 8, 12, 16, 24, 32)


@dataclass(frozen=True)
class Choice:
    k_chunk: int
    n_tb: int
    base_us: float
    pair_us: float

    @property
    def slowdown(self) -> float:
        return self.pair_us / self.base_us - 1


def best_for_shape(p: DeviceProfile, out: int, inp: int, bits: int, max_slowdown: float) -> Choice:
    """Largest k_chunk (then fewest blocks) predicted within `max_slowdown`; k_chunk 0 if none is."""
    base = predict_base_us(p, out, inp, bits)
    best = Choice(0, 0, base, base)
    for k in K_CHOICES:
        fits = [Choice(k, tb, base, predict_pair_us(p, out, inp, bits, k, tb)) for tb in TB_CHOICES]
        fits = [c for c in fits if c.slowdown <= max_slowdown]
        if fits:
            best = min(fits, key=lambda c: (c.pair_us, c.n_tb))
    return best


def tune(p: DeviceProfile, shapes: dict[str, tuple[int, int, int, int]], step_us: float, target: float) -> dict[str, Choice]:
    """`shapes`: name -> (out, in, bits, count per step); `step_us`: the base decode step's time.
    Returns a Choice per shape; raises ConfigError when not even k_chunk 1 fits the target."""
    if target < 0:
        raise ConfigError(f"target slowdown {target} is negative: allowed 0 .. 10 (a fraction, 0.05 = 5 %)")
    linear_us = sum(predict_base_us(p, o, i, b) * n for o, i, b, n in shapes.values())
    per_layer = target * step_us / linear_us
    choices = {name: best_for_shape(p, o, i, b, per_layer) for name, (o, i, b, n) in shapes.items()}
    if all(c.k_chunk == 0 for c in choices.values()):
        cheapest = min(
            (predict_pair_us(p, o, i, b, 1, tb) - predict_base_us(p, o, i, b)) * n / step_us
            for o, i, b, n in shapes.values() for tb in TB_CHOICES
        )
        raise ConfigError(
            f"target slowdown {target:.1%} cannot be met on {p.device}: the least compensation "
            f"(k_chunk 1 on one layer shape) already costs {cheapest:.1%} of the step"
        )
    return choices


def predicted_step_us(p: DeviceProfile, shapes, choices: dict[str, Choice], step_us: float) -> float:
    """The base step plus every group's predicted extra time at its chosen k_chunk and n_tb."""
    extra = sum((choices[name].pair_us - choices[name].base_us) * n for name, (o, i, b, n) in shapes.items())
    return step_us + extra
