"""Tuner: k_chunk and n_tb per linear-group shape, to compensate as much as a target slowdown allows.

The target is for the whole decode step: the budget of extra time is target * step_us (the measured
base step), spent greedily over each shape's frontier of (k_chunk, n_tb) points (`tune`).
`tune_groups` is what `runtime.compile` calls: the model's groups keyed by (kind, bits), a measured
latency model, the measured step -> a `Tuning` (choices and the predicted step).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from decdec.constants import n_selected
from decdec.errors import ConfigError
from decdec.scheduler.latency import MeasuredModel

TOLERANCE = 0.005  # a measured step may exceed the target slowdown by this (half a point of the step)
SPENT = 0.01  # ... and a plan measured this far under the target leaves budget to spend (`tune_measured`)
ROUNDS = 8  # tune-and-measure rounds: to meet the target, then to spend it (`tune_measured`)
MIN_SCALE = 0.25  # the least measured / predicted cost a group's moves are taken at (a noisy free move)
REPEATS = 3  # measurements of a tuned step, each in turns with the base step; the median decides
# every k_chunk up to 128: on a large layer (Llama-3-8B's gate_up) one step of k can cost about a point of
# the step, and a coarser grid leaves a budget of a few points unspent
K_CHOICES = tuple(range(1, 129)) + tuple(range(160, 1025, 32))


@dataclass(frozen=True)
class Choice:
    k_chunk: int
    n_tb: int
    base_us: float
    pair_us: float

    @property
    def slowdown(self) -> float:
        return self.pair_us / self.base_us - 1


def frontier(p, out: int, inp: int, bits: int) -> list[Choice]:
    """The cheapest n_tb for each k_chunk, keeping only points that cost more as k_chunk grows
    (a larger k_chunk that is no dearer makes the smaller one pointless). k is floor-scaled in a partial
    chunk, so on an input narrower than a chunk several k select the same channels: only the smallest
    of them is a point (the others would be moves that fetch nothing more), and no k that selects no
    channel is one (k = 1 picks none of 576)."""
    base = p.base_us(out, inp, bits)
    best: list[Choice] = []
    counts = [n_selected(inp, k) for k in K_CHOICES]
    for k, n, before in zip(K_CHOICES, counts, [0] + counts):
        if n == before:  # the channels of the k before (or none)
            continue
        pairs = [Choice(k, tb, base, p.pair_us(out, inp, bits, k, tb)) for tb in p.n_tb_choices(out, inp, bits)]
        pairs = [c for c in pairs if c.pair_us < float("inf")]
        if pairs:
            best.append(min(pairs, key=lambda c: (c.pair_us, c.n_tb)))
    kept: list[Choice] = []
    for c in reversed(best):  # from the largest k_chunk down: keep strictly cheaper points
        if not kept or c.pair_us < kept[-1].pair_us:
            kept.append(c)
    return kept[::-1]


def tune(p: MeasuredModel, shapes: dict[str, tuple[int, int, int, int]], step_us: float,
         target: float) -> dict[str, Choice]:
    """`shapes`: name -> (out, in, bits, count per step); `step_us`: the base decode step's time.

    Spends the budget target * step_us greedily: at each move, among the shapes whose next frontier
    point still fits the budget, the one that adds the most corrected residual weights
    (selected channels x out x count) per µs of step time. Raises ConfigError when not even the
    cheapest move fits (the config keeps the target within 0 .. 10)."""
    budget = target * step_us
    fronts = {name: frontier(p, o, i, b) for name, (o, i, b, n) in shapes.items()}
    chosen = {name: Choice(0, 0, p.base_us(o, i, b), p.base_us(o, i, b)) for name, (o, i, b, n) in shapes.items()}
    step_of = {name: 0 for name in shapes}
    spent = 0.0
    while True:
        moves = []
        for name, (o, i, b, n) in shapes.items():
            if step_of[name] < len(fronts[name]):
                nxt, cur = fronts[name][step_of[name]], chosen[name]
                cost = (nxt.pair_us - cur.pair_us) * n
                gain = (n_selected(i, nxt.k_chunk) - n_selected(i, cur.k_chunk)) * o * n  # residual weights fetched
                if spent + cost <= budget:
                    moves.append((gain / max(cost, 1e-9), cost, name, nxt))
        if not moves:
            break
        _, cost, name, nxt = max(moves, key=lambda m: (m[0], m[2]))
        spent += cost
        chosen[name] = nxt
        step_of[name] += 1
    if all(c.k_chunk == 0 for c in chosen.values()):
        cheapest = cheapest_slowdown(p, shapes, step_us)
        raise ConfigError(
            f"target slowdown {target:.1%} cannot be met on {p.device}: the least compensation "
            f"(the smallest k_chunk on one layer shape) already costs {cheapest:.1%} of the step"
        )
    return chosen


def cheapest_slowdown(p: MeasuredModel, shapes: dict, step_us: float) -> float:
    """The step slowdown of the least compensation: the smallest k_chunk on the cheapest shape."""
    costs = []
    for out, inp, bits, count in shapes.values():
        front = frontier(p, out, inp, bits)
        if front:
            costs.append((front[0].pair_us - front[0].base_us) * count / step_us)
    return min(costs, default=float("inf"))


def predicted_step_us(p: MeasuredModel, shapes, choices: dict[str, Choice], step_us: float) -> float:
    """The base step plus every group's predicted extra time at its chosen k_chunk and n_tb."""
    extra = sum((choices[name].pair_us - choices[name].base_us) * n for name, (o, i, b, n) in shapes.items())
    return step_us + extra


@dataclass(frozen=True)
class Tuning:
    """What compile chose for a target slowdown: k_chunk and n_tb per (kind, bits) linear-group shape."""

    target: float
    step_us: float  # the base decode step, measured (median of graph replays)
    predicted_step_us: float  # step_us plus every group's predicted extra time at its choice
    choices: dict  # (kind, bits) -> Choice
    shapes: dict  # (kind, bits) -> (out, in, bits, groups per step)
    profile: str = ""  # the device profile the predictions come from
    rounds: tuple = ()  # `Round`s of `tune_measured`
    accepted: int = -1  # the index of the round whose plan this is

    @property
    def measured_step_us(self) -> float | None:
        return self.rounds[self.accepted].measured_step_us if self.rounds else None

    @property
    def predicted_slowdown(self) -> float:
        return self.predicted_step_us / self.step_us - 1

    @property
    def k_chunks(self) -> dict:
        """(kind, bits) -> k_chunk, as `models.graph.build_graph` takes it."""
        return {key: c.k_chunk for key, c in self.choices.items()}

    @property
    def n_tbs(self) -> dict:
        """(kind, bits) -> n_tb (0 where k_chunk is 0)."""
        return {key: c.n_tb for key, c in self.choices.items()}

    def format(self) -> str:
        lines = [f"{'group':<8} {'bits':>4} {'out x in':>11} {'count':>5} {'base µs':>8} {'k_chunk':>7} {'n_tb':>4} "
                 f"{'pair µs':>8} {'slowdown':>8}"]
        for (kind, bits), c in sorted(self.choices.items()):
            out, inp, _, count = self.shapes[kind, bits]
            lines.append(f"{kind:<8} {bits:>4} {f'{out}x{inp}':>11} {count:>5} {c.base_us:>8.1f} {c.k_chunk:>7} "
                         f"{c.n_tb:>4} {c.pair_us:>8.1f} {c.slowdown:>+8.1%}")
        lines.append(f"step: {self.step_us:.1f} µs measured without DecDEC, {self.predicted_step_us:.1f} µs "
                     f"predicted with it ({self.predicted_slowdown:+.1%}; target {self.target:.1%})")
        for i, r in enumerate(self.rounds):
            mark = " (this plan)" if i == self.accepted % len(self.rounds) else ""
            plan = " ".join(f"{kind}@{bits}={k}" for (kind, bits), k in r.k_chunks)
            lines.append(f"round {i + 1}: tuned for {r.budget:.2%} ({plan}), predicted {r.predicted_step_us:.1f} µs, "
                         f"measured {r.measured_step_us:.1f} µs ({r.measured_step_us / self.step_us - 1:+.1%}){mark}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Round:
    """One tune-and-measure round: the slowdown the tuner spent, its predicted and the measured step."""

    budget: float
    predicted_step_us: float
    measured_step_us: float  # the median of the round's measurements
    samples: tuple = ()  # every measurement (µs)
    k_chunks: tuple = ()  # the round's plan: ((kind, bits), k_chunk) of every compensated group


def check_shapes(model: MeasuredModel, shapes: dict, where: str | Path = "") -> None:
    """ConfigError naming every shape of `shapes` that `model` (loaded from `where`) did not measure."""
    missing = [f"{kind} {o}x{i} at {b} bits" for (kind, _), (o, i, b, _) in shapes.items()
               if not model.measured(o, i, b)]
    if missing:
        profile = f"device profile '{where}'" if where else "the device profile"
        raise ConfigError(f"{profile} ({model.device}) has no measurements of {', '.join(missing)}: "
                          "run `decdec tune CFG` with this model's config")


def tune_groups(model: MeasuredModel, shapes: dict, step_us: float, target: float,
                where: str | Path = "") -> Tuning:
    """`shapes`: (kind, bits) -> (out, in, bits, count per step) (`models.graph.group_shapes`);
    `step_us`: the base decode step, measured. ConfigError when `where` lacks one of the shapes, or
    when the target cannot be met (`tune`)."""
    check_shapes(model, shapes, where)
    choices = tune(model, shapes, step_us, target)
    return Tuning(target, step_us, predicted_step_us(model, shapes, choices, step_us), choices, shapes, str(where))


@dataclass
class StepCosts:
    """What the measured rounds say a group's move costs in the whole step: the profile's extra time
    times `scale`, plus `on` µs where the move turns the group's correction on (on the H100 a group's
    first correction costs points of the step that the profile's isolated pair does not show). A value
    measured on one group stands for its kind at other bits until those are measured themselves."""

    scale: dict  # (kind, bits) -> measured / predicted extra time of its moves
    on: dict  # (kind, bits) -> µs beyond that of turning it on
    measured: set = field(default_factory=set)  # ((kind, bits), turns_on) measured on their own

    @classmethod
    def start(cls, shapes: dict, first: Tuning, measured_us: float) -> "StepCosts":
        """From the first plan that met the target, measured `measured_us`: where the step cost more than
        predicted, the excess is the cost of turning its groups on (on the H100 a group's correction
        costs about the same at its smallest k_chunk as at four times that), spread over their instances
        and assumed alike for every other group's until measured; where less, every move costs the
        measured share of the prediction."""
        predicted, excess = first.predicted_step_us - first.step_us, measured_us - first.predicted_step_us
        if excess <= 0:
            ratio = max(MIN_SCALE, (measured_us - first.step_us) / predicted) if predicted > 0 else 1.0
            return cls({name: ratio for name in shapes}, {name: 0.0 for name in shapes})
        instances = sum(shapes[name][3] for name, c in first.choices.items() if c.k_chunk)
        return cls({name: 1.0 for name in shapes}, {name: excess * shapes[name][3] / instances for name in shapes})

    def cost(self, name, move: float, turns_on: bool) -> float:
        return move * self.scale[name] + (self.on[name] if turns_on else 0.0)

    def learn(self, name, move: float, turns_on: bool, measured: float) -> None:
        """A move of `name` whose profile extra time is `move` µs measured `measured` µs in the step."""
        if turns_on:
            table, value = self.on, max(0.0, measured - move * self.scale[name])
        else:
            table, value = self.scale, max(MIN_SCALE, measured / max(move, 1e-3))
        self.measured.add((name, turns_on))
        for other in table:
            if other == name or (other[0] == name[0] and (other, turns_on) not in self.measured):
                table[other] = value


def tune_measured(model: MeasuredModel, shapes: dict, step_us: float, target: float, build: Callable,
                  measure: Callable, where: str | Path = "") -> tuple[Tuning, object]:
    """`tune_groups`, checked on the device: build(tuning) captures the tuned step and measure(built)
    times it (µs, like `step_us`). The profile times each pair on its own, and a whole step can cost
    more than the sum (seen on Llama-3-8B shapes: gigabytes of residual tables, whose host pages the
    GPU must translate on every fetch, against a profile that rotated a few tables; and a group's first
    correction costs more in the step than in isolation) or less (the pairs overlap their neighbours in
    the step's graph). So the plan is searched on measurements, in two phases:
    - to meet the target: while no plan has, the budget is rescaled by the measured over the predicted
      extra time and shrunk while the measured slowdown exceeds target + TOLERANCE (a budget below the
      least compensation, one shape at its smallest k_chunk, becomes that plan's cost, tried once);
    - to spend it: while the best plan that met it is more than SPENT under, each round raises one group
      (`_raised`) and learns from the measurement what that move costs in the whole step (`StepCosts`:
      the groups are told apart because only one changes a round).
    `measure` times the tuned step in turns with the base step and scales it to `step_us` (a
    fetch-heavy step moves by a few % of itself between measurements minutes apart); each plan is
    measured `REPEATS` times and the median decides. Returns (the tuning of the most compensating plan
    that met the target, with every round, and its build); ConfigError when no round meets the target."""
    budget, history, best = target, [], None  # best: (tuning, build, round index)
    floor = cheapest_slowdown(model, shapes, step_us) * (1 + 1e-9)  # the least compensation's budget
    costs, raised = None, None  # StepCosts once a plan met the target; this round's (group, profile µs, turns on)
    for _ in range(ROUNDS):
        if best is None:
            t = tune_groups(model, shapes, step_us, budget, where)  # ConfigError when even round 1 cannot fit
        else:
            t, budget, raised = _raised(model, shapes, step_us, target, best[0], history[best[2]].measured_step_us,
                                        costs, where)
            if t is None:
                break
        built = build(t)
        samples = tuple(measure(built) for _ in range(REPEATS))
        measured = statistics.median(samples)
        history.append(Round(budget, t.predicted_step_us, measured, samples,
                             tuple((key, k) for key, k in sorted(t.k_chunks.items()) if k)))
        predicted_extra, measured_extra = t.predicted_step_us - step_us, measured - step_us
        if raised is not None:
            costs.learn(*raised, measured - history[best[2]].measured_step_us)
        if measured / step_us - 1 <= target + TOLERANCE:
            if best is None:
                costs = StepCosts.start(shapes, t, measured)
            best = (t, built, len(history) - 1)
            if measured / step_us - 1 >= target - SPENT:
                break
            continue
        del built  # frees the rejected capture before the next one
        if best is not None:
            continue
        budget = min(0.9 * budget, target * max(predicted_extra, 0.0) / measured_extra)  # measured_extra > 0 here
        if budget < floor:  # below the least compensation: try that one plan, unless this round was it
            if t.predicted_slowdown <= floor:
                break
            budget = floor
    if best is not None:
        t, built, accepted = best
        return replace(t, target=target, rounds=tuple(history), accepted=accepted), built
    tried = "; ".join(f"tuned for {r.budget:.2%}: predicted {r.predicted_step_us / step_us - 1:+.1%}, measured "
                      f"{r.measured_step_us / step_us - 1:+.1%}" for r in history)
    raise ConfigError(f"target slowdown {target:.1%} cannot be met on {model.device}: measured on the whole step, "
                      f"the compensation the tuner could afford cost more ({tried})")


def _raised(model: MeasuredModel, shapes: dict, step_us: float, target: float, best: Tuning, best_us: float,
            costs: StepCosts, where) -> tuple[Tuning | None, float, tuple | None]:
    """`best` (measured `best_us`) with one group raised: for each group, the largest k_chunk on its
    frontier whose cost in the step (`costs`) fits what the target leaves; of those, the one that adds
    the most corrected residual weights per µs (as `tune` moves). Returns (its tuning, the slowdown it
    is expected to measure, (the group, the profile's extra µs of the move, whether it turns the group
    on)); (None, 0, None) when no group's move fits."""
    left = target * step_us - (best_us - step_us)
    options = []
    for name, (o, i, b, n) in shapes.items():
        cur = best.choices[name]
        on = cur.k_chunk == 0
        fits = [c for c in frontier(model, o, i, b)
                if c.k_chunk > cur.k_chunk and costs.cost(name, (c.pair_us - cur.pair_us) * n, on) <= left]
        if fits:
            c = fits[-1]
            move = (c.pair_us - cur.pair_us) * n
            gain = (n_selected(i, c.k_chunk) - n_selected(i, cur.k_chunk)) * o * n
            options.append((gain / max(costs.cost(name, move, on), 1e-9), name, c, move))
    if not options:
        return None, 0.0, None
    _, name, c, move = max(options, key=lambda m: (m[0], m[1]))
    choices = {**best.choices, name: c}
    on = best.choices[name].k_chunk == 0
    t = Tuning(target, step_us, predicted_step_us(model, shapes, choices, step_us), choices, shapes, str(where))
    return t, (best_us + costs.cost(name, move, on)) / step_us - 1, (name, move, on)
