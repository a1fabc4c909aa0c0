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
from decdec.scheduler.tuner import (ROUNDS, SPENT, TOLERANCE, cheapest_slowdown, frontier, predicted_step_us, tune_groups,
                                    tune_measured)

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
    qkv = next(line for line in text.splitlines() if "L0.qkv.selector+dma+correction+merge" in line)
    down = next(line for line in text.splitlines() if "L0.down.selector+dma+correction+merge" in line)
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
    assert sum(tuning.k_chunks.values()) > sum(builds[0].k_chunks.values())  # more compensation than round 1
    assert "(this plan)" in tuning.format().splitlines()[-1]


def raised_groups(tuning) -> list[set]:
    """Per round after the first: the groups whose k_chunk differs from the best plan measured before it."""
    out, best = [], dict(tuning.rounds[0].k_chunks)
    for r in tuning.rounds[1:]:
        plan = dict(r.k_chunks)
        out.append({g for g in set(plan) | set(best) if plan.get(g, 0) != best.get(g, 0)})
        if r.measured_step_us / tuning.step_us - 1 <= tuning.target + TOLERANCE:
            best = plan
    return out


@pytest.mark.parametrize("target, down", [(0.05, 0), (0.1, 5)])
def test_tune_measured_learns_what_each_group_costs_in_the_step(target, down):
    """Seen on Llama-3-8B shapes on the H100 at 5 %: gate_up at k_chunk 8 measured +3.8 %, and every larger
    plan the profile offered went over: down or qkv at their smallest k_chunk cost 2 to 3.5 points each
    in the whole step, where the profile saw under one. Once a plan meets the target, each round raises
    one group, so the cost of turning a group on is measured on its own: too dear for 5 % here, where the
    budget goes to the others; at 10 % down fits at a smaller k_chunk than the first one tried."""
    model, step, builds = hand_made(SHAPES, COST), 1000.0, []
    fixed = 12.0  # µs per down group in the step beyond the profile, once its correction runs

    def measure(t):
        extra = sum((c.pair_us - c.base_us) * SHAPES[name][3] * 0.5 for name, c in t.choices.items())
        return step + extra + sum(fixed * SHAPES[name][3] for name, c in t.choices.items()
                                  if name[0] == "down" and c.k_chunk)

    tuning, built = tune_measured(model, SHAPES, step, target, *whole_step(step, 1.0, builds)[:1], measure)
    assert target - SPENT <= tuning.measured_step_us / step - 1 <= target + TOLERANCE
    assert built is builds[tuning.accepted] and tuning.k_chunks["down", 3] == 0 and tuning.k_chunks["down", 4] == down
    assert all(len(groups) == 1 for groups in raised_groups(tuning))  # one group raised a round
    assert len({r.k_chunks for r in tuning.rounds}) == len(tuning.rounds)  # no plan measured twice
    turned_on = [r for r in tuning.rounds[1:] if any(g[0] == "down" for g, _ in r.k_chunks)]
    assert len(turned_on) <= 2  # the cost of turning down on, measured at one bit width, holds for the other


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
    assert all(r.measured_step_us / step - 1 > 0.05 + TOLERANCE for r in tuning.rounds[1:])
    # each group's move measured once, then known too dear: the search ends before its rounds run out
    assert 1 < len(tuning.rounds) < ROUNDS and len({r.k_chunks for r in tuning.rounds}) == len(tuning.rounds)


@pytest.mark.parametrize("fixed, share", [(2.0, 0.3), (5.0, 0.3), (1.0, 1.0), (0.0, 0.5), (3.0, 2.0)])
@pytest.mark.parametrize("target", [0.025, 0.05, 0.1, 0.2])
def test_tune_measured_spends_the_budget_whatever_turning_a_group_on_costs(fixed, share, target):
    """Measured on the H100 (bench/results/tuner_step_costs_00899e0_h100.json): the first plan to meet
    Llama-3-8B's 5 % target, gate_up at k_chunk 4, was predicted +0.14 % and measured +1.97 %. Taken as
    a scale of every move, that excess left no move that fit; it is the cost of turning corrections on.
    Here each group instance costs `fixed` µs once on, and its k_chunk `share` of the profile's time."""
    shapes = group_shapes(ARGS, [3] * 4)
    model, step = hand_made(shapes, COST), 1000.0

    def measure(t):
        return step + sum((c.pair_us - c.base_us) * shapes[name][3] * share + (fixed * shapes[name][3] if c.k_chunk else 0)
                          for name, c in t.choices.items())

    tuning, _ = tune_measured(model, shapes, step, target, lambda t: t, measure)
    maxed = all(c.k_chunk == frontier(model, *shapes[name][:3])[-1].k_chunk for name, c in tuning.choices.items())
    assert tuning.measured_step_us / step - 1 <= target + TOLERANCE
    assert maxed or tuning.measured_step_us / step - 1 >= target - SPENT


def test_the_first_plans_excess_is_the_cost_of_turning_its_groups_on():
    """The H100 case in numbers: the first plan meeting the target predicted +0.14 %, measured +1.97 %."""
    from decdec.scheduler.tuner import StepCosts
    shapes = group_shapes(ARGS, [3] * 4)  # 4 instances of each kind
    model, step = hand_made(shapes, COST), 1000.0
    first = tune_groups(model, shapes, step, 0.0014)
    on = [name for name, c in first.choices.items() if c.k_chunk]
    costs = StepCosts.start(shapes, first, step * 1.0197)
    excess = step * 1.0197 - first.predicted_step_us
    assert all(costs.scale[name] == 1.0 for name in shapes)  # a k_chunk move costs what the profile says
    assert sum(costs.on[name] for name in on) == pytest.approx(excess)
    assert all(costs.on[name] == pytest.approx(excess / len(on)) for name in shapes)  # alike per instance
    cheaper = StepCosts.start(shapes, first, first.step_us + 0.5 * (first.predicted_step_us - first.step_us))
    assert all(cheaper.scale[name] == pytest.approx(0.5) and cheaper.on[name] == 0 for name in shapes)
