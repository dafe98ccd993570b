import math

import pytest

from dgg.analysis import (
    EvalPoint,
    compare_to_baseline,
    converged_accuracy,
    cost_to_reach,
    degradation_onset,
    mean_and_std,
    speedup,
    summarise_run,
)


def evals(accuracies, rollouts_per_eval=100, seconds_per_eval=10.0):
    return [{"kind": "eval", "batch": i, "rollouts": i * rollouts_per_eval, "wall_time": i * seconds_per_eval,
             "eval/accuracy": a} for i, a in enumerate(accuracies)]


def test_converged_accuracy_is_the_mean_of_the_last_five():
    points = [EvalPoint(i, i, i, a) for i, a in enumerate([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])]
    assert converged_accuracy(points) == pytest.approx(0.4)


def test_cost_to_reach_and_speedup_by_hand():
    points = [EvalPoint(i, 100 * i, 10.0 * i, a) for i, a in enumerate([0.1, 0.3, 0.5, 0.5])]
    assert cost_to_reach(points, 0.45) == 200 and cost_to_reach(points, 0.45, "wall_time") == 20.0
    assert cost_to_reach(points, 0.9) is None
    assert speedup(400, 200) == 2.0 and speedup(400, None) is None


def test_table1_speedups_against_the_single_use_baseline():
    single = evals([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])  # converged 0.5, first reached at 400
    dgg = evals([0.1, 0.3, 0.5, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55], seconds_per_eval=20.0)  # at 200, 40 s
    naive = evals([0.1, 0.4, 0.45, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1])  # never reaches 0.5, collapses
    out = compare_to_baseline({"single": single, "dgg": dgg, "naive": naive})
    assert out["single"].rollout_speedup == 1.0
    assert out["dgg"].rollout_speedup == pytest.approx(400 / 200)
    assert out["dgg"].wall_clock_speedup == pytest.approx(40.0 / 40.0)
    assert out["naive"].rollout_speedup is None and out["naive"].collapsed
    assert out["naive"].onset_rollouts == 200 and not out["dgg"].collapsed


def test_no_speedup_when_the_baseline_never_improved():
    flat = evals([0.0] * 6)
    out = compare_to_baseline({"single": flat, "dgg": flat})
    assert out["dgg"].rollout_speedup is None


def test_degradation_onset_needs_a_real_drop():
    assert degradation_onset([EvalPoint(i, i, i, a) for i, a in enumerate([0.1, 0.5, 0.45, 0.45, 0.44, 0.46])]) is None


def test_a_short_run_still_climbing_is_not_collapsed():
    # the SmolLM2 demo's single-use curve (6 evaluations): the mean of the last five is 0.39, 0.12 under its
    # peak, but the peak is the last evaluation, so nothing was lost
    climbing = [EvalPoint(i, i, i, a) for i, a in enumerate([0.133, 0.258, 0.352, 0.391, 0.438, 0.508])]
    assert degradation_onset(climbing) is None
    fell = [EvalPoint(i, i, i, a) for i, a in enumerate([0.133, 0.258, 0.352, 0.508, 0.30, 0.28])]
    assert degradation_onset(fell) == fell[3]


def test_gate_statistics_from_update_records():
    records = evals([0.1, 0.2]) + [
        {"kind": "update", "reuse_index": 2, "gate/discard": True, "gate/reason": "zscore", "actor/applied": False},
        {"kind": "update", "reuse_index": 1, "gate/discard": False, "actor/applied": True},
        {"kind": "update", "reuse_index": 3, "gate/discard": True, "gate/reason": "zscore", "actor/applied": False},
        {"kind": "rollout", "gate/reuse_count": 1, "rollouts": 10, "wall_time": 1.0},
        {"kind": "rollout", "gate/reuse_count": 2, "rollouts": 20, "wall_time": 2.0},
    ]
    s = summarise_run(records, "dgg")
    assert s.discards == 2 and s.discards_by_reuse_index == {"2": 1, "3": 1}
    assert s.mean_reuse_per_batch == 1.5 and s.updates == 1


def test_mean_and_std_skip_missing_values():
    mean, std, missing = mean_and_std([2.0, None, 4.0, math.inf])
    assert (mean, missing) == (3.0, 2) and std == pytest.approx(math.sqrt(2))
