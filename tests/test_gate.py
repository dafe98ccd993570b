import json
import math
import statistics

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dgg import GateDecision, GradientGate


def feed(gate, energies, reuse_index=2):
    return [gate.observe(e, reuse_index) for e in energies]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"tau": float("nan")}, "tau"),
        ({"tau": "0.5"}, "tau"),
        ({"window": 1}, "window"),
        ({"window": 2.5}, "window"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-8}, "eps"),
        ({"history": "recent"}, "history"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GradientGate(**kwargs)


def test_infinite_tau_is_allowed():
    assert GradientGate(tau=float("inf")).tau == math.inf


def test_bad_reuse_index_is_refused():
    gate = GradientGate()
    for bad in (0, -1, 1.0, True):
        with pytest.raises(ValueError, match="reuse_index"):
            gate.observe(1.0, bad)


def test_first_observation_only_sets_previous_energy():
    gate = GradientGate(window=2)
    d = gate.observe(5.0, 3)
    assert d == GateDecision(energy=5.0, delta=None, z=None, ready=False, discard=False, reason=None)
    d = gate.observe(7.0, 3)
    assert d.delta == 2.0 and d.z is None and not d.ready


def test_hand_computed_zscore_and_window():
    # energies 1, 2, 4, 7, 17 -> increments 1, 2, 3, 10
    gate = GradientGate(tau=100.0, window=3, eps=1e-8)
    d1, d2, d3, d4, d5 = feed(gate, [1.0, 2.0, 4.0, 7.0, 17.0])
    assert (d1.delta, d1.z) == (None, None)
    assert (d2.delta, d2.z) == (1.0, None)  # no increment held yet
    assert (d3.delta, d3.z) == (2.0, None)  # one increment held: no sample std
    assert d4.delta == 3.0 and not d4.ready
    assert d4.z == pytest.approx((3 - 1.5) / (statistics.stdev([1, 2]) + 1e-8))
    assert d5.ready and d5.delta == 10.0
    assert d5.z == pytest.approx((10 - 2) / (1 + 1e-8))  # mean and ddof=1 std of [1, 2, 3]
    d6 = gate.observe(18.0, 2)  # the window has slid to [2, 3, 10]
    assert d6.z == pytest.approx((1 - statistics.mean([2, 3, 10])) / (statistics.stdev([2, 3, 10]) + 1e-8))


def test_discard_rule_needs_full_window_reuse_and_z_above_tau():
    gate = GradientGate(tau=0.5, window=3)
    feed(gate, [1.0, 2.0, 4.0, 7.0])  # window full: [1, 2, 3]
    assert gate.ready
    spike_k1 = gate.observe(100.0, 1)  # k = 1: never discarded
    assert not spike_k1.discard and spike_k1.z > 0.5

    gate = GradientGate(tau=0.5, window=3)
    feed(gate, [1.0, 2.0, 4.0, 7.0])
    spike = gate.observe(100.0, 2)
    assert spike.discard and spike.reason == "zscore" and spike.z == pytest.approx((93 - 2) / (1 + 1e-8))
    calm = gate.observe(8.0, 2)  # z = (1 - 2) / 1 < tau
    assert not calm.discard and calm.reason is None


def test_not_ready_means_no_discard_even_for_huge_z():
    gate = GradientGate(tau=0.1, window=20)
    decisions = feed(gate, [1.0, 2.0, 3.0, 1000.0])
    assert decisions[-1].z > 100 and not decisions[-1].ready and not decisions[-1].discard


def test_discarded_observation_changes_no_state():
    gate = GradientGate(tau=0.5, window=3)
    feed(gate, [1.0, 2.0, 4.0, 7.0])
    before = gate.state_dict()
    assert gate.observe(100.0, 3).discard
    after = gate.state_dict()
    assert after["increments"] == before["increments"]
    assert after["last_accepted_energy"] == before["last_accepted_energy"] == 7.0
    # the next delta is measured from the last accepted energy, 7, not from the discarded 100
    assert gate.observe(9.0, 1).delta == 2.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("k", [1, 2])
def test_non_finite_energy_is_always_discarded_without_state_change(bad, k):
    gate = GradientGate(window=3)
    feed(gate, [1.0, 2.0])
    before = gate.state_dict()
    d = gate.observe(bad, k)
    assert d.discard and d.reason == "non_finite" and d.delta is None and d.z is None
    after = gate.state_dict()
    for key in ("increments", "last_accepted_energy"):
        assert after[key] == before[key]
    assert gate.discards_by_reason == {"non_finite": 1}


def test_non_finite_first_observation_does_not_set_previous_energy():
    gate = GradientGate()
    assert gate.observe(float("nan"), 1).discard
    assert gate.observe(3.0, 1).delta is None


def test_history_reuse_keeps_only_reuse_increments_but_advances_previous_energy():
    gate = GradientGate(tau=0.5, window=2, history="reuse")
    gate.observe(10.0, 1)  # first
    d = gate.observe(20.0, 1)  # fresh batch: delta 10 not held
    assert d.delta == 10.0 and gate.state_dict()["increments"] == []
    gate.observe(18.0, 2)  # delta -2 held
    gate.observe(17.0, 3)  # delta -1 held
    assert gate.state_dict()["increments"] == [-2.0, -1.0]
    assert gate.state_dict()["last_accepted_energy"] == 17.0
    d = gate.observe(30.0, 1)  # a fresh-batch jump: k = 1 never discarded, and not held
    assert not d.discard and gate.state_dict()["increments"] == [-2.0, -1.0]
    d = gate.observe(31.0, 2)  # delta 1 vs mean -1.5, std 0.707 -> z ~ 3.5
    assert d.discard and d.z == pytest.approx((1 + 1.5) / (statistics.stdev([-2, -1]) + 1e-8))


def test_history_all_holds_fresh_batch_increments():
    gate = GradientGate(window=2, history="all")
    feed(gate, [10.0], reuse_index=1)
    gate.observe(20.0, 1)
    assert gate.state_dict()["increments"] == [10.0]


def test_history_same_k_scores_a_step_against_earlier_steps_at_its_own_reuse_index():
    gate = GradientGate(tau=0.5, window=2, history="same_k")
    # Two batches of K = 3: fresh-batch jumps at k = 1, small decays at k = 2, smaller at k = 3.
    for energy, k in [(10.0, 1), (9.0, 2), (8.8, 3), (20.0, 1), (18.0, 2), (17.9, 3)]:
        gate.observe(energy, k)
    windows = gate.state_dict()["increments_by_index"]
    assert windows == {"1": [20.0 - 8.8], "2": [-1.0, -2.0], "3": [pytest.approx(-0.2), pytest.approx(-0.1)]}
    assert gate.ready_at(2) and gate.ready_at(3) and not gate.ready_at(1)
    gate.observe(30.0, 1)
    # A rise at k = 2 that the paper's window (held jumps of +10) would accept: z vs k = 2's own [-1, -2] is huge.
    d = gate.observe(31.0, 2)
    assert d.discard and d.ready and d.z == pytest.approx((1.0 + 1.5) / (statistics.stdev([-1.0, -2.0]) + 1e-8))
    paper = GradientGate(tau=0.5, window=2, history="all")
    for energy, k in [(10.0, 1), (9.0, 2), (8.8, 3), (20.0, 1), (18.0, 2), (17.9, 3), (30.0, 1)]:
        paper.observe(energy, k)
    assert not paper.observe(31.0, 2).discard


def test_history_same_k_state_round_trips_and_continues_identically():
    gate = GradientGate(tau=0.1, window=3, history="same_k")
    for i, e in enumerate([5.0, 4.0, 3.9, 6.0, 5.1, 5.0, 7.0, 6.5, 6.4, 8.0]):
        gate.observe(e, 1 + i % 3)
    restored = GradientGate()
    restored.load_state_dict(json.loads(json.dumps(gate.state_dict())))
    assert repr(restored) == repr(gate) and restored.history == "same_k"
    for i, e in enumerate([7.9, 9.5, 9.0, 8.9, 12.0, 5.0]):
        assert restored.observe(e, 1 + i % 3) == gate.observe(e, 1 + i % 3)


def test_a_state_with_too_many_increments_at_one_index_is_refused():
    state = GradientGate(window=2, history="same_k").state_dict()
    state["increments_by_index"] = {"3": [1.0, 2.0, 3.0]}
    with pytest.raises(ValueError, match="k=3"):
        GradientGate().load_state_dict(state)


def test_counters():
    gate = GradientGate(tau=0.5, window=3)
    feed(gate, [1.0, 2.0, 4.0, 7.0])
    gate.observe(100.0, 2)
    gate.observe(float("nan"), 2)
    assert gate.counters() == {
        "gate/observations": 6,
        "gate/discards": 2,
        "gate/discards_non_finite": 1,
        "gate/discards_zscore": 1,
    }


def test_state_round_trips_through_json_and_continues_identically():
    gate = GradientGate(tau=0.1, window=4, history="reuse")
    energies = [5.0, 6.0, 5.5, 5.2, 7.0, 6.1, 6.0, 9.0, 6.2, 6.1]
    for i, e in enumerate(energies):
        gate.observe(e, 1 + i % 3)
    restored = GradientGate()
    restored.load_state_dict(json.loads(json.dumps(gate.state_dict())))
    assert repr(restored) == repr(gate)
    for i, e in enumerate([6.3, 12.0, 6.1, 6.0, 30.0, 5.0]):
        assert restored.observe(e, 2 + i % 2) == gate.observe(e, 2 + i % 2)


def test_infinite_tau_state_round_trips():
    gate = GradientGate(tau=float("inf"))
    restored = GradientGate()
    restored.load_state_dict(json.loads(json.dumps(gate.state_dict())))
    assert restored.tau == math.inf


def test_bad_state_is_refused():
    with pytest.raises(ValueError, match="missing"):
        GradientGate().load_state_dict({"tau": 0.5})


energies = st.lists(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), min_size=3, max_size=40)


@settings(max_examples=200, deadline=None)
@given(energies, st.floats(min_value=0.01, max_value=100), st.floats(min_value=-100, max_value=100))
def test_z_is_invariant_under_positive_affine_maps(values, a, b):
    g1, g2 = GradientGate(tau=0.5, window=4), GradientGate(tau=0.5, window=4)
    for i, v in enumerate(values):
        held = g1.state_dict()["increments"]
        d1, d2 = g1.observe(v, 1 + i % 4), g2.observe(a * v + b, 1 + i % 4)
        if d1.z is None:
            assert d2.z is None
            continue
        assume(statistics.stdev(held) * min(a, 1.0) > 1e-2)  # away from the ε floor, where z is not scale-free
        assert d2.z == pytest.approx(d1.z, rel=1e-5, abs=1e-5)
        assert d1.discard == d2.discard


@settings(max_examples=200, deadline=None)
@given(energies, st.sampled_from(["all", "reuse", "same_k"]), st.floats(min_value=-10, max_value=10))
def test_no_finite_observation_is_discarded_at_first_reuse_index(values, history, tau):
    gate = GradientGate(tau=tau, window=2, history=history)
    for i, v in enumerate(values):
        k = 1 + i % 3
        d = gate.observe(v, k)
        if k == 1:
            assert not d.discard


@settings(max_examples=100, deadline=None)
@given(energies, st.lists(st.integers(min_value=1, max_value=4), min_size=40, max_size=40))
def test_state_round_trip_property(values, reuse_indices):
    gate = GradientGate(tau=0.3, window=3)
    half = len(values) // 2
    for v, k in zip(values[:half], reuse_indices):
        gate.observe(v, k)
    twin = GradientGate()
    twin.load_state_dict(json.loads(json.dumps(gate.state_dict())))
    for v, k in zip(values[half:], reuse_indices[half:]):
        assert twin.observe(v, k) == gate.observe(v, k)
