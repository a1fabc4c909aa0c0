"""The device profile (JSON), the model's group shapes, per-group k_chunk / n_tb in the graph, and the
compile-side tuning (`tune_groups`) on a hand-made measured model: all pure Python, no GPU."""

import json

import pytest

from decdec.models.arch import LINEAR_KINDS, ModelArgs
from decdec.models.graph import build_graph, group_shapes
from decdec.constants import n_selected
from decdec.errors import ConfigError
from decdec.scheduler.latency import MeasuredModel
from decdec.scheduler.plan import schedule
from decdec.scheduler.profile import MeasuredProfile, default_path, slug
from decdec.scheduler.tuner import (BISECTIONS, ROUNDS, SPENT, TOLERANCE, _untried, cheapest_slowdown, frontier, predicted_step_us,
                                    tune_groups, tune_measured)

ARGS = ModelArgs("llama", 100, 1024, 4, 2, 1, 512, 2048, 1e-5, 1e4)  # dim 1024 (whole chunks), 4 layers, ffn 2048
MIXED_BITS = [4, 3, 3, 4]  # a 3.5-bit model: half the layers at 4 bits


def hand_made(shapes: dict, cost: dict, base_us: float = 10.0) -> MeasuredModel:
    """Pair time base + k * cost[kind] at n_tb 8 and twice that at n_tb 2, measured at k 4, 16, 64."""
    rows = []
    for (kind, bits), (out, inp, b, _) in shapes.items():
        for k in (4, 16, 64):
            for tb, factor in ((2, 2.0), (8, 1.0)):
                rows.append({"out": out, "in": inp, "bits": b, "k_chunk": k, "n_tb": tb, "base_us": base_us,
                             "pair_us": base_us + k * cost[kind] * factor})
    return MeasuredModel.from_rows("Test GPU", rows)


def profile_of(model: MeasuredModel) -> MeasuredProfile:
    return MeasuredProfile("Test GPU", 132, 3000.0, 49.5, model, [4, 16, 64], [2, 8])


SHAPES = group_shapes(ARGS, MIXED_BITS)
COST = {"qkv": 0.1, "o": 0.4, "gate_up": 0.05, "down": 1.0}


def test_group_shapes_of_a_mixed_bit_model():
    assert set(SHAPES) == {(kind, bits) for kind in LINEAR_KINDS for bits in (3, 4)}
    for (kind, bits), (out, inp, b, count) in SHAPES.items():
        assert (out, inp) == ARGS.linear_shape(kind) and b == bits and count == 2
    uniform = group_shapes(ARGS, [3] * 4)
    assert set(uniform) == {(kind, 3) for kind in LINEAR_KINDS} and uniform["down", 3] == (1024, 2048, 3, 4)


def test_profile_json_round_trip(tmp_path):
    profile = profile_of(hand_made(SHAPES, COST))
    path = tmp_path / "sub" / "gpu.json"
    profile.save(path)
    assert not list(path.parent.glob("*.tmp"))
    loaded = MeasuredProfile.load(path)
    assert loaded == profile
    assert loaded.model.pair_us(1024, 2048, 3, 10, 8) == profile.model.pair_us(1024, 2048, 3, 10, 8)
    assert "1024x2048x3" in loaded.model.base and "1024x2048x4" in loaded.model.base
    assert json.loads(path.read_text())["format"] == 1  # plain JSON, readable by anything


def test_profile_errors_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="none.json' is not a valid profile"):
        MeasuredProfile.load(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=f"'{bad}' is not a valid profile"):
        MeasuredProfile.load(bad)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": 0}))
    with pytest.raises(ConfigError, match="has format 0"):
        MeasuredProfile.load(old)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"format": 1, "device": "x"}))
    with pytest.raises(ConfigError, match="is not a valid profile"):
        MeasuredProfile.load(partial)
    profile = profile_of(hand_made(SHAPES, COST))
    profile.check_device("Test GPU", "p.json")
    with pytest.raises(ConfigError, match="measured on 'Test GPU', but this GPU is 'Other GPU'.*decdec tune"):
        profile.check_device("Other GPU", "p.json")


def test_default_path_is_a_slug_of_the_gpu_name(tmp_path, monkeypatch):
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    monkeypatch.setenv("DECDEC_CACHE", str(tmp_path))  # beside the artifacts, in the per-user cache
    assert default_path("NVIDIA H200") == tmp_path / "device-profiles" / "nvidia-h200.json"


def corrections(graph) -> dict:
    return {(n.layer, n.attr("group")): n for n in graph.nodes if n.op == "correction"}


def test_build_graph_takes_k_chunk_and_n_tb_per_kind_and_bits():
    k = {("qkv", 3): 8, ("qkv", 4): 16, ("o", 3): 0, ("o", 4): 0, ("gate_up", 3): 32, ("gate_up", 4): 32,
         ("down", 4): 4, ("down", 3): 12}
    tb = {("qkv", 3): 4, ("qkv", 4): 16, ("gate_up", 3): 0, ("gate_up", 4): 0, ("down", 3): 8, ("down", 4): 8}
    # o has no correction, so its n_tb is never asked
    graph = build_graph(ARGS, MIXED_BITS, k, tb)
    corr = corrections(graph)
    for layer, bits in enumerate(MIXED_BITS):
        assert (layer, "o") not in corr
        assert corr[layer, "qkv"].attr("k_chunk") == (8 if bits == 3 else 16)
        assert corr[layer, "qkv"].attr("n_tb") == (4 if bits == 3 else 16)
        assert corr[layer, "gate_up"].attr("k_chunk") == 32 and corr[layer, "gate_up"].attr("n_tb") is None
        assert corr[layer, "down"].attr("k_chunk") == (12 if bits == 3 else 4) and corr[layer, "down"].attr("n_tb") == 8
    # one int for all, n_tb unset: the graph of before (no n_tb attribute anywhere)
    plain = build_graph(ARGS, MIXED_BITS, 16)
    assert all(n.attr("k_chunk") == 16 and n.attr("n_tb") is None for n in corrections(plain).values())
    with pytest.raises(ValueError, match="k_chunk has no value for the down groups at 3 bits"):
        build_graph(ARGS, MIXED_BITS, {**{(kind, b): 8 for kind in ("qkv", "o", "gate_up") for b in (3, 4)},
                                       ("down", 4): 8})


def test_plan_format_shows_n_tb_where_set():
    text = schedule(build_graph(ARGS, [3] * 4, 16, {("qkv", 3): 12, ("o", 3): 0, ("gate_up", 3): 0, ("down", 3): 0})).format()
    assert "n_tb" in text.splitlines()[0]
    qkv = next(line for line in text.splitlines() if "L0.qkv.rms_norm+selector+dma+correction+merge " in line)
    down = next(line for line in text.splitlines() if "L0.down.act_mul+selector+dma+correction+merge+residual_add " in line)
    assert qkv.split()[6:8] == ["16", "12"] and down.split()[6:8] == ["16", "8*"]  # * : the default n_tb


def test_tune_groups_spends_the_target_per_kind_and_bits():
    model = hand_made(SHAPES, COST)
    step = 1000.0
    tuning = tune_groups(model, SHAPES, step, 0.05, "p.json")
    assert set(tuning.choices) == set(SHAPES)
    assert tuning.step_us == step and tuning.target == 0.05 and tuning.profile == "p.json"
    assert tuning.predicted_step_us == pytest.approx(predicted_step_us(model, SHAPES, tuning.choices, step))
    assert step < tuning.predicted_step_us <= step * 1.05 + 1e-9
    # cheap shapes get more channels than dear ones, every chosen n_tb is the cheaper one measured
    assert tuning.k_chunks["gate_up", 3] > tuning.k_chunks["down", 3]
    assert all(tuning.n_tbs[key] == (8 if k else 0) for key, k in tuning.k_chunks.items())
    # the graph takes the tuning as it is
    corr = corrections(build_graph(ARGS, MIXED_BITS, tuning.k_chunks, tuning.n_tbs))
    for (layer, kind), node in corr.items():
        assert node.attr("k_chunk") == tuning.k_chunks[kind, MIXED_BITS[layer]] > 0
        assert node.attr("n_tb") == tuning.n_tbs[kind, MIXED_BITS[layer]]
    assert "target 5.0%" in tuning.format() and "gate_up" in tuning.format()
    # more budget, at least as much compensation everywhere
    more = tune_groups(model, SHAPES, step, 0.5)
    assert all(more.k_chunks[key] >= k for key, k in tuning.k_chunks.items())


def test_tune_groups_errors():
    model = hand_made({key: s for key, s in SHAPES.items() if key != ("down", 4)}, COST)
    with pytest.raises(ConfigError, match=r"'p.json' \(Test GPU\) has no measurements of down 1024x2048 at 4 bits.*"
                                          "decdec tune"):
        tune_groups(model, SHAPES, 1000.0, 0.05, "p.json")
    full = hand_made(SHAPES, COST)
    with pytest.raises(ConfigError, match="target slowdown 0.0% cannot be met on Test GPU"):
        tune_groups(full, SHAPES, 1000.0, 0.0)


def whole_step(step: float, factor: float, builds: list):
    """build / measure stand-ins: the built plan is its tuning; the measured step costs `factor` times
    the predicted extra time (the whole step dearer than the profile's isolated pairs)."""
    def build(tuning):
        builds.append(tuning)
        return tuning

    return build, lambda tuning: step + factor * (tuning.predicted_step_us - step)


def test_tune_measured_accepts_a_step_that_meets_the_target_at_once():
    model, step, builds = hand_made(SHAPES, COST), 1000.0, []
    tuning, built = tune_measured(model, SHAPES, step, 0.05, *whole_step(step, 1.0, builds))
    assert built is builds[0] and len(tuning.rounds) == 1 and tuning.target == 0.05
    assert tuning.measured_step_us == pytest.approx(tuning.predicted_step_us)
    assert "round 1: tuned for 5.00% (" in tuning.format()
    assert tuning.rounds[0].k_chunks == tuple((key, k) for key, k in sorted(tuning.k_chunks.items()) if k)


def test_tune_measured_shrinks_the_budget_until_the_measured_step_meets_the_target():
    model, step, builds = hand_made(SHAPES, COST), 1000.0, []
    tuning, built = tune_measured(model, SHAPES, step, 0.05, *whole_step(step, 3.0, builds))
    assert len(tuning.rounds) >= 2 and built is builds[-1]
    assert tuning.measured_step_us / step - 1 <= 0.05 + TOLERANCE
    assert tuning.rounds[0].measured_step_us / step - 1 > 0.05 + TOLERANCE  # the first plan was over
    assert all(b.budget < a.budget for a, b in zip(tuning.rounds, tuning.rounds[1:]))
    assert sum(tuning.k_chunks.values()) < sum(builds[0].k_chunks.values())  # less compensation than asked first
    assert tuning.target == 0.05  # the user's target, not the shrunken budget


def test_tune_measured_fails_clearly_when_no_round_meets_the_target():
    model, step = hand_made(SHAPES, COST), 1000.0
    with pytest.raises(ConfigError, match=r"target slowdown 5.0% cannot be met on Test GPU: measured on the whole "
                                          r"step.*tuned for 5.00%: predicted \+[0-9.]+%, measured \+"):
        tune_measured(model, SHAPES, step, 0.05, *whole_step(step, 1000.0, []))


def test_tune_measured_tries_the_least_compensation_before_giving_up():
    """Seen on Gemma 3 270M at 5 %: round 1 measured +5.6 %, round 2 (+4.4 % predicted) +5.9 %, and the
    shrunken budget fell below the cheapest move (+3.8 %), which was never tried. It is now tried once."""
    model, builds = hand_made(SHAPES, COST), []
    step = cheapest_slowdown(model, SHAPES, 1.0) / 0.0399  # the least compensation costs 3.99 % of this step
    floor = cheapest_slowdown(model, SHAPES, step)
    # the whole step costs 1.3x the prediction: round 1 (4.99 %: the cheapest move and one k_chunk more)
    # measures 6.5 %, its shrunken budget (3.8 %) is below the cheapest plan, which measures 5.2 %
    tuning, built = tune_measured(model, SHAPES, step, 0.05, *whole_step(step, 1.3, builds))
    assert built is builds[-1] and len(tuning.rounds) == 2
    assert tuning.rounds[-1].budget == pytest.approx(floor) and tuning.predicted_slowdown == pytest.approx(floor)
    assert sum(1 for k in tuning.k_chunks.values() if k) == 1
    assert tuning.measured_step_us / step - 1 == pytest.approx(1.3 * floor)
    builds.clear()
    with pytest.raises(ConfigError, match="cannot be met"):  # the cheapest plan itself too dear: one try, then out
        tune_measured(model, SHAPES, step, 0.05, *whole_step(step, 1.5, builds))
    assert builds[-1].predicted_slowdown == pytest.approx(floor)


def test_tuner_moves_only_to_k_chunks_that_fetch_more_channels():
    """k_chunk is floor-scaled in a partial chunk: on inputs of 64 (and SmolLM2's 576) many k select
    no channel, or the channels of the k before, yet each would be a move of its own. Only the
    smallest k of each channel count is on the frontier, so every move of the budget fetches more."""
    narrow = group_shapes(ModelArgs("llama", 100, 64, 4, 2, 1, 32, 128, 1e-5, 1e4), MIXED_BITS)
    model = hand_made(narrow, COST)
    for (kind, bits), (out, inp, b, _) in narrow.items():
        counts = [n_selected(inp, c.k_chunk) for c in frontier(model, out, inp, b)]
        assert counts and counts[0] > 0 and all(lo < hi for lo, hi in zip(counts, counts[1:]))
    assert [c.k_chunk for c in frontier(model, 64, 64, 3)] == [16, 32, 48, 64]  # 1, 2, 3, 4 channels
    tuning = tune_groups(model, narrow, 1000.0, 0.5)
    assert all(k == 0 or n_selected(narrow[key][1], k) > 0 for key, k in tuning.k_chunks.items())
    assert any(k for k in tuning.k_chunks.values())


def test_tuner_spends_a_budget_one_k_chunk_at_a_time_past_16():
    """Where one k_chunk costs half a point of the step, a 9 % target buys k 18 (+9.0 %), not the 16 (+8 %)
    of a grid that steps by 4 past 16."""
    shapes = {("gate_up", 3): (256, 1024, 3, 2)}
    model = hand_made(shapes, {"gate_up": 0.05})  # +0.1 µs per k_chunk per step (two groups)
    tuning = tune_groups(model, shapes, 20.0, 0.0901)
    assert tuning.k_chunks == {("gate_up", 3): 18} and tuning.predicted_slowdown == pytest.approx(0.09)


def test_tune_measured_judges_a_plan_by_its_median_measurement():
    """One measurement of three far over (+7 % beside +4 %, +4 %: a noisy turn) does not reject a plan of a
    5 % target; two of three over do."""
    model, step = hand_made(SHAPES, COST), 1000.0

    def run(factors):
        noise = iter(factors + [1.0] * 30)  # measured extra / predicted extra, per call
        return tune_measured(model, SHAPES, step, 0.05, lambda t: t,
                             lambda t: step + next(noise) * (t.predicted_step_us - step))[0]

    tuning = run([1.0, 1.0 + 0.07 / 0.05, 1.0])
    first = tuning.rounds[0]
    assert len(first.samples) == 3 and first.measured_step_us == sorted(first.samples)[1]
    assert tuning.accepted == 0 and tuning.measured_step_us / step - 1 <= 0.05 + TOLERANCE
    tuning = run([1.0 + 0.07 / 0.05] * 2 + [1.0])
    assert tuning.rounds[0].measured_step_us / step - 1 > 0.05 + TOLERANCE and tuning.accepted > 0


def test_tune_measured_spends_the_budget_when_the_whole_step_costs_less_than_predicted():
    """Programmatic launch overlaps a correction with its neighbours: the step can cost less than the
    profile's isolated pairs, and the plan tuned for the target alone leaves budget unspent."""
    model, step, builds = hand_made(SHAPES, COST), 1000.0, []
    tuning, built = tune_measured(model, SHAPES, step, 0.05, *whole_step(step, 0.5, builds))
    assert built is builds[-1] and len(tuning.rounds) >= 2 and tuning.accepted == len(tuning.rounds) - 1
    assert 0.05 - SPENT <= tuning.measured_step_us / step - 1 <= 0.05 + TOLERANCE
    assert tuning.rounds[1].budget > tuning.rounds[0].budget
    assert sum(tuning.k_chunks.values()) > sum(builds[0].k_chunks.values())  # more compensation than round 1
    assert "(this plan)" in tuning.format().splitlines()[-1]


def test_tune_measured_bisects_between_the_plan_that_met_the_target_and_a_grown_one_that_went_over():
    """Seen on Llama-3-8B shapes at 10 %: gate_up at k_chunk 16 measured +7.8 %, the grown plan went over,
    and the first one stood with two points of the budget unspent."""
    model, step, builds = hand_made(SHAPES, COST), 1000.0, []
    build, _ = whole_step(step, 1.0, builds)

    def measure(tuning):  # cheap while small, dear once the plan grows past 6 % predicted
        extra = tuning.predicted_step_us - step
        return step + (0.5 if extra <= 0.06 * step else 2.0) * extra

    tuning, built = tune_measured(model, SHAPES, step, 0.05, build, measure)
    slowdowns = [r.measured_step_us / step - 1 for r in tuning.rounds]
    assert slowdowns[0] < 0.05 - SPENT and slowdowns[1] > 0.05 + TOLERANCE  # round 1 under, the grown plan over
    met = [i for i, s in enumerate(slowdowns) if s <= 0.05 + TOLERANCE]
    assert len(met) >= 2 and tuning.accepted == max(met, key=lambda i: tuning.rounds[i].predicted_step_us)
    assert built is builds[tuning.accepted] and tuning.measured_step_us == tuning.rounds[tuning.accepted].measured_step_us
    assert tuning.predicted_step_us > tuning.rounds[0].predicted_step_us  # more compensation than round 1
    assert len({r.predicted_step_us for r in tuning.rounds}) == len(tuning.rounds)  # no plan measured twice
    assert all(tuning.rounds[0].budget < r.budget < tuning.rounds[1].budget for r in tuning.rounds[2:])


def test_tune_measured_keeps_the_first_plan_when_every_larger_one_goes_over():
    shapes = {k: v for k, v in SHAPES.items() if k[0] == "down"}
    model, step, builds = hand_made(shapes, COST), 1000.0, []
    build, _ = whole_step(step, 1.0, builds)
    first = tune_groups(model, shapes, step, 0.05)

    def measure(tuning):  # round 1's plan far under the target, anything larger far over
        extra = tuning.predicted_step_us - step
        return step + (0.1 if tuning.predicted_step_us <= first.predicted_step_us else 5.0) * extra

    tuning, built = tune_measured(model, shapes, step, 0.05, build, measure)
    assert tuning.accepted == 0 and built is builds[0] and tuning.choices == first.choices
    assert len(tuning.rounds) == ROUNDS and len({r.predicted_step_us for r in tuning.rounds}) == ROUNDS


def test_bisection_ends_where_no_plan_lies_between():
    model, step = hand_made(SHAPES, COST), 1000.0
    best = tune_groups(model, SHAPES, step, 0.05)
    over = 0.05 * (1 + 1e-9)  # no budget in between buys another plan
    assert _untried(model, SHAPES, step, over, (best, None, 0, 0.05), over, "")[1] is None
    budget, t = _untried(model, SHAPES, step, 0.05, (best, None, 0, 0.05), None, "")  # the same plan: the next move
    assert 0.05 < budget <= 0.05 * 1.1 ** BISECTIONS and t.predicted_step_us > best.predicted_step_us
    assert tune_groups(model, SHAPES, step, budget / 1.1).predicted_step_us == best.predicted_step_us  # the least growth
    budget, t = _untried(model, SHAPES, step, 0.1, (best, None, 0, 0.05), None, "")
    assert budget == 0.1 and t.predicted_step_us > best.predicted_step_us
