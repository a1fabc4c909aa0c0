"""Latency model fit and tuner, on synthetic measurements from a known profile (no GPU needed)."""

import pytest

from decdec.errors import ConfigError
from decdec.constants import n_selected
from decdec.scheduler.latency import MeasuredModel, weight_bytes
from decdec.scheduler.plan import schedule
from decdec.scheduler.tuner import predicted_step_us, tune

SHAPES = {"qkv": (6144, 4096, 3, 32), "o": (4096, 4096, 3, 32), "gate_up": (28672, 4096, 3, 32), "down": (4096, 14336, 3, 32)}
K_GRID = tuple(range(1, 17)) + (24, 32, 64, 128)


def base_us(out: int, inp: int, bits: int) -> float:
    """A synthetic GPU: 3 µs fixed plus the weights at 2.4 MB/µs."""
    return 3.0 + weight_bytes(out, inp, bits) / 2.4e6


def pair_us(out: int, inp: int, bits: int, k: int, tb: int) -> float:
    """The base slowed by the blocks it loses, or the correction's fetch at 6 KB/µs a block (45 KB/µs
    at most) after a 4 µs floor, whichever is longer."""
    fetch = n_selected(inp, k) * out / 2 / min(45e3, tb * 6e3) + 4.0
    return max(base_us(out, inp, bits) * (1 + 0.5 * tb / 132), fetch) + 0.1


TRUE = MeasuredModel.from_rows("test-gpu", [
    {"out": o, "in": i, "bits": b, "k_chunk": k, "n_tb": tb, "base_us": base_us(o, i, b), "pair_us": pair_us(o, i, b, k, tb)}
    for o, i, b, _ in SHAPES.values() for k in K_GRID for tb in (2, 8, 32)])


def test_more_budget_never_less_compensation():
    step = 1.25 * sum(base_us(o, i, b) * n for o, i, b, n in SHAPES.values())
    previous = 0
    for target in (0.025, 0.05, 0.10, 0.20):
        choices = tune(TRUE, SHAPES, step, target)
        assert predicted_step_us(TRUE, SHAPES, choices, step) <= step * (1 + target) + 1e-6
        corrected = sum(choices[n].k_chunk * o * i * c for n, (o, i, b, c) in SHAPES.items())
        assert corrected >= previous > 0 or (previous == 0 and corrected > 0)
        previous = corrected


def test_unreachable_target_is_a_clear_error():
    step = sum(base_us(o, i, b) * n for o, i, b, n in SHAPES.values())
    with pytest.raises(ConfigError, match=r"target slowdown 0.0% cannot be met on test-gpu"):
        tune(TRUE, SHAPES, step, 0.0)
    with pytest.raises(ConfigError, match="cannot be met"):  # nothing fits a negative budget either
        tune(TRUE, SHAPES, step, -0.1)


def test_plan_fuses_logical_ops_into_launches():
    from decdec.models.arch import ModelArgs
    from decdec.models.graph import build_graph

    args = ModelArgs("llama", 100, 64, 2, 2, 1, 32, 128, 1e-5, 1e4)
    graph = build_graph(args, [3, 3], 16)
    plan = schedule(graph)
    ops = [(launch.op, launch.stream) for launch in plan.launches if launch.layer == 0]
    corr = "selector+dma+correction+merge"
    assert ops == [  # the glue folds into each GEMV and, beside it, into its correction
        ("rms_norm+" + corr, 1), ("rms_norm+base_gemv", 0), ("attention", 0),
        (corr + "+residual_add", 1), ("base_gemv+residual_add", 0),
        ("rms_norm+" + corr, 1), ("rms_norm+base_gemv", 0),
        ("act_mul+" + corr + "+residual_add", 1), ("act_mul+base_gemv+residual_add", 0)]
    # every logical node is carried out, in a topological order; only folded glue twice (GEMV and correction)
    done = [n for launch in plan.launches for n in launch.nodes]
    assert set(done) == set(graph.nodes)
    assert {n.op for n in done if done.count(n) > 1} == {"rms_norm", "act_mul", "residual_add"}
    # events: a side launch waits for its input's maker; what both streams complete (the merged output,
    # the folded add's) is waited for from the other stream, whose maker records it there
    launches = plan.launches
    assert launches[1].waits == ("x.0",) and launches[1].records == ("qkv.0",)
    attention = launches[3]
    assert attention.waits == ("qkv.0",) and attention.records == ("attn.0",)
    side_o, main_o, side_gu, main_gu = launches[4:8]
    assert (side_o.waits, side_o.records) == (("attn.0", "x.0"), ("xa.0",))
    assert (main_o.records, side_gu.waits, main_gu.waits) == (("xa.0",), ("xa.0",), ("xa.0",))
    assert "fuse" not in plan.format() and corr in plan.format()
    uncompensated = schedule(build_graph(args, [3, 3], 0))
    assert [launch.op for launch in uncompensated.launches if launch.layer == 0] == [
        "rms_norm+base_gemv", "attention", "base_gemv+residual_add", "rms_norm+base_gemv",
        "act_mul+base_gemv+residual_add"]
    assert not any(launch.waits or launch.records for launch in uncompensated.launches)
    unfolded = schedule(graph, folds=())  # the corrections read the norm's output: the side waits for it
    assert [(launch.op, launch.waits) for launch in unfolded.launches[1:3]] == [("rms_norm", ()), (corr, ("h.0",))]
    cpu = schedule(graph, fuse=False)
    assert [launch.nodes[0] for launch in cpu.launches] == graph.nodes
    assert all(launch.stream == 0 and not launch.waits for launch in cpu.launches)  # one stream


def test_measured_model_interpolates_and_never_extrapolates():
    from decdec.scheduler.latency import MeasuredModel

    rows = [{"out": 64, "in": 1024, "bits": 3, "k_chunk": k, "n_tb": 4, "base_us": 10.0, "pair_us": 10.0 + k}
            for k in (4, 16)]
    m = MeasuredModel.from_rows("x", rows)
    assert m.pair_us(64, 1024, 3, 10, 4) == pytest.approx(20.0)
    assert m.pair_us(64, 1024, 3, 0, 4) == 10.0
    assert m.pair_us(64, 1024, 3, 32, 4) == float("inf")
    assert m.n_tb_choices(64, 1024, 3) == [4]
    choice = tune(m, {"l": (64, 1024, 3, 1)}, step_us=10.0, target=1.0)["l"]
    assert (choice.k_chunk, choice.n_tb) == (10, 4)  # +10 µs on a 10 µs step is exactly 100 %
