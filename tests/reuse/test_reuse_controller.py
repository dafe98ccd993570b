"""Tests for src/dgg/reuse/controller.py: the one reuse decision, and the reference trainer's path through it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dgg.reuse import ReuseController, StepVerdict
from dgg.reuse_rules import AttemptSignals, RuleSettings
from reuse_script import EXPECTED_REASONS, RULE, SCRIPT, SETTINGS, reference_metrics, statistics
from trainer_helpers import make_trainer, read_metrics


def test_statistics_are_token_weighted_over_micro_batches_by_hand():
    controller = ReuseController("none")
    controller.add_micro_batch({"kl": 0.1, "ratio_max": 2.0, "masked_tokens": 1.0}, tokens=3, has_signal=False)
    controller.add_micro_batch({"kl": 0.4, "ratio_max": 5.0, "masked_tokens": 2.0}, tokens=1, has_signal=True)
    verdict = controller.decide(2, lm_head_energy=0.5, grad_norm=1.0)
    # kl: 0.1 · 3/4 + 0.4 · 1/4; the largest ratio; token counts add up; any micro-batch with signal counts.
    assert verdict.statistics == {"kl": pytest.approx(0.175), "masked_tokens": 3.0, "ratio_max": 5.0}
    assert verdict.signals.approx_kl == pytest.approx(0.175)
    assert verdict.signals.active_tokens == 4 and verdict.signals.has_signal is True
    assert verdict.apply and verdict.reason is None


def test_agreement_across_ranks_weights_by_the_tokens_of_every_rank():
    calls = []

    def two_identical_ranks(values, op):  # what all-reducing over two ranks holding the same numbers gives
        calls.append(op)
        return [2 * v for v in values] if op == "sum" else values

    controller = ReuseController("kl", RuleSettings(target_kl=0.1), agree=two_identical_ranks)
    controller.add_micro_batch({"kl": 0.1, "ratio_max": 3.0}, tokens=3, has_signal=True)
    controller.add_micro_batch({"kl": 0.4, "ratio_max": 2.0}, tokens=1, has_signal=False)
    verdict = controller.decide(2, 0.5, 1.0)
    assert verdict.signals.active_tokens == 8 and verdict.statistics["kl"] == pytest.approx(0.175)
    assert verdict.statistics["ratio_max"] == 3.0 and calls == ["sum", "sum", "max"]
    assert verdict.reason == "kl"  # 0.175 > 1.5 × 0.1, on every rank alike


def test_a_non_finite_gradient_reaches_no_rule_and_is_not_a_stop():
    controller = ReuseController("dgg+nosignal")
    controller.add_micro_batch({"kl": 0.0}, 4, True)
    verdict = controller.decide(1, math.inf, 1.0)
    assert not verdict.apply and verdict.reason == "non_finite_grad"
    assert verdict.metrics()["reuse/stop"] is False and controller.gate.observations == 0
    assert controller.stops_by_reason == {}


@pytest.mark.parametrize("fresh_drop", ["end_batch", "skip_step"])
def test_a_drop_at_k1_skips_the_step_alone_only_under_skip_step_and_a_reuse_drop_always_stops(fresh_drop):
    controller = ReuseController("nosignal", RuleSettings(fresh_drop=fresh_drop))
    skips = fresh_drop == "skip_step"
    for reuse_index, ends in ((1, not skips), (2, True)):  # a batch without advantage, fresh then reused
        controller.add_micro_batch({"kl": 0.0}, 4, has_signal=False)
        verdict = controller.decide(reuse_index, 1.0, 1.0)
        assert not verdict.apply and verdict.reason == "nosignal:no_advantage"
        assert verdict.stop is ends and verdict.skip_only is (not ends)
        assert verdict.metrics()["reuse/stop"] is ends and verdict.metrics()["reuse/step_skipped"] is (not ends)
    assert controller.stops_by_reason == {"nosignal:no_advantage": 2}  # every drop is counted by its reason
    # A non-finite gradient, or a loss abandoned before the decision, follows the same rule at k = 1.
    assert controller.decide(1, math.nan, 1.0).stop is not skips
    assert controller.abandon(1, "non_finite_loss").stop is not skips
    assert controller.abandon(2, "non_finite_loss").stop
    with pytest.raises(ValueError, match="fresh_drop must be one of end_batch, skip_step"):
        ReuseController("gradnorm", RuleSettings(fresh_drop="skip"))


def test_the_scripted_sequence_gives_the_expected_verdicts_and_vocabulary():
    metrics = reference_metrics((3.0, 5.0))
    reasons = [None if m["actor/applied"] else r for m, r in zip(metrics, EXPECTED_REASONS)]
    assert reasons == EXPECTED_REASONS
    assert metrics[5]["gate/discard"] == 1.0 and metrics[7]["reuse/stop"] == 1.0
    # k1 KL of attempt 8: -(−0.04 · 3/8 − 0.06 · 5/8) = 0.0525
    assert metrics[7]["actor/log_ratio_mean"] == pytest.approx(-0.0525) and metrics[7]["kl/estimate"] == \
        pytest.approx(0.0525)


def test_watch_only_applies_every_step_and_logs_what_the_rule_would_have_done():
    live, watch = ReuseController(RULE, SETTINGS), ReuseController(RULE, SETTINGS, watch_only=True)
    verdicts = []
    for attempt in SCRIPT[:9]:
        for controller in (live, watch):
            for index in (0, 1):
                controller.add_micro_batch(statistics(attempt, index), 4, attempt.has_signal)
        verdicts.append((live.decide(attempt.reuse_index, attempt.energy, attempt.grad_norm),
                         watch.decide(attempt.reuse_index, attempt.energy, attempt.grad_norm)))
    assert all(w.apply for _, w in verdicts)
    assert [w.would_reason for _, w in verdicts] == [None, None, None, None, None, "dgg:zscore", None, "kl",
                                                     "nosignal:no_advantage"]
    metrics = verdicts[5][1].metrics()
    assert metrics["reuse/would_stop"] is True and metrics["reuse/would_stop_reason"] == "dgg:zscore"
    assert metrics["reuse/stop"] is False and watch.stops_by_reason == {}
    # In watch mode every step was applied, so the gate's statistics moved with each (the spike included);
    # live, the gate counted its discard and saw neither the spike nor the steps other rules dropped.
    assert watch.gate.discards == 0 and watch.gate.observations == 9
    assert watch.gate.state_dict()["last_accepted_energy"] == 1.6
    assert live.gate.discards == 1 and live.gate.state_dict()["last_accepted_energy"] == 1.5


def test_state_is_one_json_file_and_restores_identical_decisions():
    first, second = ReuseController(RULE, SETTINGS), ReuseController(RULE, SETTINGS)
    for attempt in SCRIPT[:5]:
        for index in (0, 1):
            first.add_micro_batch(statistics(attempt, index), 4, attempt.has_signal)
        first.decide(attempt.reuse_index, attempt.energy, attempt.grad_norm)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for controller in (first, second):
        for index in (0, 1):
            controller.add_micro_batch(statistics(SCRIPT[5], index), 4, True)
    assert first.decide(3, 50.0, 30.0).metrics() == second.decide(3, 50.0, 30.0).metrics()


def test_the_trainer_path_reaches_the_scripted_verdicts(tiny_model_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_model_dir, tmp_path, "reuse.mode=dgg", f"reuse.rule={RULE}", "reuse.tau=1.0",
                           "reuse.window=2", "reuse.target_kl=0.02", "reuse.kl_estimator=k1", "eval.every=0",
                           "optim.grad_clip=null")
    batch = trainer.collect_rollouts()
    size = batch.size // 2
    trainer.config.train.micro_batch_size = size  # two micro-batches per attempt
    tokens = tuple(float(batch.completion_mask[i * size:(i + 1) * size].sum()) for i in (0, 1))
    current, calls = {}, []

    def scripted_statistics(*args, **kwargs):
        calls.append(1)
        return statistics(current["attempt"], (len(calls) - 1) % 2)

    monkeypatch.setattr("dgg.trainer.ratio_statistics", scripted_statistics)
    monkeypatch.setattr("dgg.trainer.global_grad_norm", lambda optimizer: current["attempt"].grad_norm)
    monkeypatch.setattr(trainer.probe, "energy", lambda: torch.tensor(current["attempt"].energy))
    advantages = batch.advantages.clone()
    for attempt in SCRIPT:
        current["attempt"] = attempt
        batch.advantages = advantages if attempt.has_signal else torch.zeros_like(advantages)
        trainer.update(batch, attempt.reuse_index)
    records = [r for r in read_metrics(trainer.run_dir) if r["kind"] == "update"]
    for record, expected in zip(records, reference_metrics(tokens), strict=True):
        assert {key: record[key] for key in expected} == pytest.approx(expected)
    assert [r["reuse/stop_reason"] for r in records] == EXPECTED_REASONS


def test_a_verdict_is_plain_data():
    verdict = StepVerdict(False, "kl", AttemptSignals(reuse_index=2, lm_head_energy=1.0, grad_norm=None))
    assert verdict.stop and verdict.numeric_metrics()["reuse/stop"] == 1.0
    assert "reuse/stop_reason" not in verdict.numeric_metrics() and verdict.metrics()["reuse/stop_reason"] == "kl"
