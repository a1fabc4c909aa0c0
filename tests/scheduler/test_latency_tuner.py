"""Latency model fit and tuner, on synthetic measurements from a known profile (no GPU needed)."""

import pytest

from decdec.errors import ConfigError
from decdec.scheduler.latency import DeviceProfile, fit_profile, predict_base_us, predict_corr_us, predict_pair_us
from decdec.scheduler.plan import schedule
from decdec.scheduler.tuner import predicted_step_us, tune

TRUE = DeviceProfile("test-gpu", n_sm=132, hbm_bytes_per_us=2.4e6, base_fixed_us=3.0, pcie_bytes_per_us=45e3,
                     per_tb_bytes_per_us=6e3, corr_fixed_us=4.0, steal=0.5, pair_fixed_us=0.1)
SHAPES = {"qkv": (6144, 4096, 3, 32), "o": (4096, 4096, 3, 32), "gate_up": (28672, 4096, 3, 32), "down": (4096, 14336, 3, 32)}


def measurements(p: DeviceProfile) -> list[dict]:
    rows = []
    for out, inp, bits, _ in SHAPES.values():
        rows.append({"out": out, "in": inp, "bits": bits, "k_chunk": 0, "n_tb": 0, "base_us": predict_base_us(p, out, inp, bits)})
        for k in (8, 32, 128):
            for tb in (2, 8, 32):
                rows.append({"out": out, "in": inp, "bits": bits, "k_chunk": k, "n_tb": tb,
                             "base_us": predict_base_us(p, out, inp, bits),
                             "corr_us": predict_corr_us(p, out, inp, k, tb),
                             "pair_us": predict_pair_us(p, out, inp, bits, k, tb)})
    return rows


def test_fit_recovers_predictions():
    rows = measurements(TRUE)
    fitted = fit_profile("test-gpu", 132, rows)
    for r in rows:
        if r["k_chunk"]:
            got = predict_pair_us(fitted, r["out"], r["in"], r["bits"], r["k_chunk"], r["n_tb"])
            assert got == pytest.approx(r["pair_us"], rel=0.10)


def test_more_budget_never_less_compensation():
    step = 1.25 * sum(predict_base_us(TRUE, o, i, b) * n for o, i, b, n in SHAPES.values())
    previous = 0
    for target in (0.025, 0.05, 0.10, 0.20):
        choices = tune(TRUE, SHAPES, step, target)
        assert predicted_step_us(TRUE, SHAPES, choices, step) <= step * (1 + target) + 1e-6
        corrected = sum(choices[n].k_chunk * o * i * c for n, (o, i, b, c) in SHAPES.items())
        assert corrected >= previous > 0 or (previous == 0 and corrected > 0)
        previous = corrected


def test_unreachable_target_is_a_clear_error():
    step = sum(predict_base_us(TRUE, o, i, b) * n for o, i, b, n in SHAPES.values())
    with pytest.raises(ConfigError, match=r"target slowdown 0.0% cannot be met on test-gpu"):
        tune(TRUE, SHAPES, step, 0.0)
    with pytest.raises(ConfigError, match="is negative"):
        tune(TRUE, SHAPES, step, -0.1)


def test_plan_fuses_logical_ops_into_launches():
    from decdec.models.arch import ModelArgs
    from decdec.models.graph import build_graph

    args = ModelArgs("llama", 100, 64, 2, 2, 1, 32, 128, 1e-5, 1e4)
    graph = build_graph(args, [3, 3], 16)
    plan = schedule(graph)
    ops = [(launch.op, launch.stream) for launch in plan.launches if launch.layer == 0]
    assert ops[:6] == [("rms_norm", 0), ("selector+dma+correction+merge", 1), ("base_gemv", 0), ("attention", 0),
                       ("selector+dma+correction+merge", 1), ("base_gemv", 0)]
    assert ("residual_add+rms_norm", 0) in ops  # the norm after a residual add is fused into it
    # every logical node is carried out by exactly one launch, in a topological order
    assert sorted(n.name for launch in plan.launches for n in launch.nodes) == sorted(n.name for n in graph.nodes)
    waits = {t for launch in plan.launches for t in launch.waits}
    records = {t for launch in plan.launches for t in launch.records}
    assert waits == records  # every wait has its event recorded
    first_side = next(launch for launch in plan.launches if launch.stream == 1)
    assert first_side.waits == ("h.0",)  # the correction waits for its input only, never for the base GEMV
    assert "fuse" not in plan.format() and "selector+dma+correction+merge" in plan.format()
    cpu = schedule(graph, fuse=False)
    assert [launch.nodes[0] for launch in cpu.launches] == graph.nodes and cpu.n_streams == 1


def test_measured_model_interpolates_and_never_extrapolates():
    from decdec.scheduler.latency import MeasuredModel

    rows = [{"out": 64, "in": 128, "bits": 3, "k_chunk": k, "n_tb": 4, "base_us": 10.0, "pair_us": 10.0 + k}
            for k in (4, 16)]
    m = MeasuredModel.from_rows("x", rows)
    assert m.pair_us(64, 128, 3, 10, 4) == pytest.approx(20.0)
    assert m.pair_us(64, 128, 3, 0, 4) == 10.0
    assert m.pair_us(64, 128, 3, 32, 4) == float("inf")
    assert m.n_tb_choices(64, 128, 3) == [4]
    choice = tune(m, {"l": (64, 128, 3, 1)}, step_us=10.0, target=1.0)["l"]
    assert (choice.k_chunk, choice.n_tb) == (10, 4)  # +10 µs on a 10 µs step is exactly 100 %
