"""Reuse rules: hand-computed decisions, combination semantics, state round trips, the trainer and replay."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dgg.cli import main as cli_main
from dgg.config import ConfigError, load_config
from dgg.gate import GradientGate
from dgg.reuse_rules import (
    AttemptSignals,
    RuleSettings,
    RuleSignalMissing,
    make_rule,
    parse_rule_names,
    replay,
)
from trainer_helpers import DigitTask, make_trainer, optimizer_snapshot, read_metrics, strip_timing


def attempt(k, energy=1.0, kl=0.0, clip=0.0, m2=0.0, log_ratio=0.0, signal=True):
    return AttemptSignals(reuse_index=k, lm_head_energy=energy, approx_kl=kl, log_ratio_mean=log_ratio,
                          log_ratio_sq_mean=m2, clip_fraction=clip, ratio_max=1.0, grad_norm=1.0,
                          active_tokens=10, has_signal=signal)


def test_kl_stop_has_sb3_semantics_checked_before_the_step():
    rule = make_rule("kl", RuleSettings(target_kl=0.02))  # stops above 1.5 × 0.02 = 0.03
    assert rule.observe(attempt(1, kl=5.0)).apply  # never at k = 1
    assert rule.observe(attempt(2, kl=0.0299)).apply
    verdict = rule.observe(attempt(3, kl=0.0301))
    assert not verdict.apply and verdict.reason == "kl" and verdict.values["kl/estimate"] == 0.0301
    spinning_up = make_rule("kl", RuleSettings(target_kl=0.02, kl_estimator="k1"))
    assert spinning_up.observe(attempt(2, kl=0.0, log_ratio=-0.031)).reason == "kl"  # mean(log π_old − log π)
    assert spinning_up.observe(attempt(2, kl=1.0, log_ratio=-0.029)).apply


def test_clip_and_m2_stops_are_thresholds_on_reuse_steps():
    clip = make_rule("clip", RuleSettings(target_clip=0.25))
    assert clip.observe(attempt(1, clip=0.9)).apply and clip.observe(attempt(2, clip=0.25)).apply
    assert clip.observe(attempt(2, clip=0.26)).reason == "clip"
    m2 = make_rule("m2", RuleSettings(target_m2=0.04))
    assert m2.observe(attempt(2, m2=0.04)).apply and m2.observe(attempt(4, m2=0.05)).reason == "m2"


def test_no_signal_guard_drops_batches_without_advantage_and_spent_reuse_steps():
    rule = make_rule("nosignal", RuleSettings(signal_floor=1e-3))
    assert rule.observe(attempt(1, signal=False)).reason == "nosignal:no_advantage"  # even at k = 1
    assert rule.observe(attempt(1, energy=2.0)).apply
    assert rule.observe(attempt(2, energy=0.0021)).apply  # 1.05e-3 of the first energy
    verdict = rule.observe(attempt(3, energy=0.0019))
    assert verdict.reason == "nosignal:energy_floor"
    assert verdict.values["nosignal/relative_energy"] == pytest.approx(0.00095)
    off = make_rule("nosignal", RuleSettings(signal_floor=0))
    off.observe(attempt(1, energy=2.0))
    assert off.observe(attempt(2, energy=0.0)).apply


def norm(value, k=1):
    return AttemptSignals(reuse_index=k, grad_norm=value)


def test_gradnorm_skip_has_olmo_core_semantics_by_hand():
    rule = make_rule("gradnorm", RuleSettings(gradnorm_window=20, gradnorm_sigma=6.0))
    # OLMo-core tests once max(20, N // 2) = 20 norms, this one included, are in: 19 before it pass untested.
    for i in range(19):
        verdict = rule.observe(norm(100.0 if i == 0 else (1.0 if i % 2 else 3.0)))
        assert verdict.apply and verdict.values == {"gradnorm/ready": False}
    # Window (19 norms): 100, then nine 1s and nine 3s alternating. Mean = 136 / 19, sample std by hand:
    previous = [100.0] + [1.0 if i % 2 else 3.0 for i in range(1, 19)]
    mean = 136 / 19
    std = math.sqrt(sum((v - mean) ** 2 for v in previous) / 18)
    verdict = rule.decide(norm(100.0))
    assert verdict.apply and verdict.values["gradnorm/z"] == pytest.approx(abs(100.0 - mean) / std)
    rule.rules[0].record(norm(100.0), True)
    # Now 20 previous norms: 100, nine 1s, nine 3s, 100 -> mean 236 / 20 = 11.8,
    # std = sqrt((2 * 88.2² + 9 * 10.8² + 9 * 8.8²) / 19) = sqrt(910.8).
    std = math.sqrt((2 * 88.2 ** 2 + 9 * 10.8 ** 2 + 9 * 8.8 ** 2) / 19)
    assert std == pytest.approx(math.sqrt(910.8))
    below, above = 11.8 + 5.99 * std, 11.8 + 6.01 * std
    assert rule.decide(norm(below)).apply
    dropped = rule.decide(norm(above, k=1))  # at k = 1 too: it is a spike guard, not only a reuse stop
    assert not dropped.apply and dropped.reason == "gradnorm" and dropped.values["gradnorm/z"] == pytest.approx(6.01)
    assert not rule.decide(norm(11.8 - 6.01 * std)).apply  # |z|: a collapse of the norm counts as well
    # A dropped step's norm still enters the window (OLMo-core appends before deciding); the oldest leaves.
    rule.rules[0].record(norm(above), False)
    assert rule.rules[0].history == [*previous[1:], 100.0, above]


def test_gradnorm_skip_window_of_identical_norms_state_and_bad_settings():
    rule = make_rule("gradnorm", RuleSettings(gradnorm_window=19))
    for _ in range(19):
        rule.observe(norm(2.0))
    assert rule.decide(norm(2.0)).apply and rule.decide(norm(2.0)).values["gradnorm/z"] == 0.0
    assert not rule.decide(norm(2.5)).apply  # any other norm is infinitely far from a constant window
    restored = make_rule("gradnorm", RuleSettings(gradnorm_window=19))
    restored.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    assert restored.rules[0].history == [2.0] * 19 and not restored.decide(norm(2.5)).apply
    with pytest.raises(RuleSignalMissing, match="grad_norm"):
        rule.decide(AttemptSignals(reuse_index=1))
    with pytest.raises(ConfigError, match="reuse.gradnorm_window"):  # 18 previous norms would never arm the test
        load_config(None, ["reuse.gradnorm_window=18"])
    with pytest.raises(ConfigError, match="reuse.gradnorm_sigma"):
        load_config(None, ["reuse.gradnorm_sigma=0"])


def test_dgg_rule_decides_exactly_as_the_gate():
    energies = [1.0, 0.1, 0.1, 0.2, 1.1, 0.1, 0.12, 0.5, 0.9, 1.2, 0.1, 3.0]
    ks = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]
    gate, rule = GradientGate(tau=0.5, window=3), make_rule("dgg", RuleSettings(tau=0.5, window=3))
    for energy, k in zip(energies, ks):
        expected = gate.observe(energy, k)
        verdict = rule.observe(attempt(k, energy=energy))
        assert verdict.apply == (not expected.discard)
        assert verdict.values["dgg/z"] == expected.z
        if expected.discard:
            assert verdict.reason == "dgg:zscore"
    assert rule.find("dgg").gate.state_dict() == gate.state_dict()
    assert gate.discards > 0


def test_combined_rules_the_first_drop_decides_and_the_gate_ignores_steps_others_dropped():
    rule = make_rule("kl+dgg", RuleSettings(target_kl=0.01, window=2))
    rule.observe(attempt(1, energy=1.0))
    before = rule.find("dgg").gate.state_dict()
    verdict = rule.observe(attempt(2, energy=0.5, kl=1.0))
    assert not verdict.apply and verdict.reason == "kl" and "dgg/z" in verdict.values
    assert rule.find("dgg").gate.state_dict() == before  # a dropped step is not an accepted observation
    assert rule.stops_by_reason == {"kl": 1}
    assert rule.observe(attempt(2, energy=0.5)).apply
    assert rule.find("dgg").gate.state_dict() != before


def test_rule_state_is_json_and_restores_identical_decisions():
    signals = [attempt(k, energy=e, kl=kl) for k, e, kl in
               [(1, 1.0, 0), (2, 0.4, 0.001), (3, 0.3, 0.002), (1, 1.2, 0), (2, 0.2, 0.01), (3, 2.0, 0.02),
                (1, 0.9, 0), (2, 0.05, 0.005), (3, 0.00001, 0.001), (4, 4.0, 0.05)]]
    spec, settings = "dgg+kl+nosignal", RuleSettings(tau=0.2, window=2, target_kl=0.02)
    whole = make_rule(spec, settings)
    expected = [whole.observe(s) for s in signals]
    first = make_rule(spec, settings)
    for s in signals[:5]:
        first.observe(s)
    resumed = make_rule(spec, settings)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.observe(s) for s in signals[5:]] == expected[5:]
    with pytest.raises(ValueError, match="differ"):
        make_rule("kl", settings).load_state_dict(first.state_dict())


def test_unknown_or_repeated_rule_names_are_refused_with_the_valid_ones():
    assert parse_rule_names("dgg+nosignal") == ["dgg", "nosignal"]
    with pytest.raises(ValueError, match="valid rules: dgg, kl, clip, m2, nosignal, gradnorm, none"):
        make_rule("dgg+kll")
    with pytest.raises(ValueError, match="twice"):
        make_rule("kl+kl")
    with pytest.raises(ConfigError, match="reuse.rule"):
        load_config(None, ["reuse.rule=sb3"])
    with pytest.raises(ConfigError, match="reuse.target_kl"):
        load_config(None, ["reuse.target_kl=0"])
    with pytest.raises(RuleSignalMissing, match="has_signal"):
        make_rule("nosignal").observe(AttemptSignals(reuse_index=1, lm_head_energy=1.0))


def test_a_rule_drop_never_reaches_the_optimizer(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, "reuse.mode=dgg", "reuse.rule=kl", "reuse.target_kl=1e-12",
                           "eval.every=0", "optim.lr=0.05")
    batch = trainer.collect_rollouts()
    assert trainer.update(batch, 1)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    adam = optimizer_snapshot(trainer.optimizer)
    assert trainer.update(batch, 2) is False  # KL > 1.5e-12 after one step at this lr
    assert all(torch.equal(p, weights[n]) for n, p in trainer.model.named_parameters())
    after = optimizer_snapshot(trainer.optimizer)
    assert all(torch.equal(after[k], v) if torch.is_tensor(v) else after[k] == v for k, v in adam.items())
    last = read_metrics(trainer.run_dir)[-1]
    assert last["reuse/stop_reason"] == "kl" and last["reuse/stop"] and not last["gate/discard"]
    assert last["gate/z"] is not None or last["gate/ready"] is False  # the gate still watches


class ConstantTask(DigitTask):
    def reward(self, completion, answer):
        return 1.0, {}


def test_no_signal_guard_in_single_use_training_skips_every_zero_advantage_batch(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, "reuse.mode=single", "reuse.rule=nosignal",
                           "train.max_batches=2", "eval.every=0", task=ConstantTask())
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.updates == 0 and trainer.state.attempts == 2
    assert trainer.optimizer.state == {}
    assert all(torch.equal(p, weights[n]) for n, p in trainer.model.named_parameters())
    updates = [r for r in read_metrics(trainer.run_dir) if r["kind"] == "update"]
    assert [r["reuse/stop_reason"] for r in updates] == ["nosignal:no_advantage"] * 2
    assert all(r["actor/has_signal"] is False for r in updates)


@pytest.mark.parametrize("spec", ["kl", "dgg+nosignal", "clip+m2"])
def test_resumed_runs_decide_identically_for_every_rule(tiny_model_dir, tmp_path, spec):
    common = ["reuse.mode=dgg", f"reuse.rule={spec}", "reuse.max_reuse=3", "reuse.window=2", "reuse.tau=0.1",
              "reuse.target_kl=0.002", "reuse.target_clip=0.05", "reuse.target_m2=0.002",
              "reuse.signal_floor=0.3", "train.checkpoint_every=2", "eval.every=0"]
    whole = make_trainer(tiny_model_dir, tmp_path / "a", "train.max_batches=4", *common)
    whole.train()
    first = make_trainer(tiny_model_dir, tmp_path / "b", "train.max_batches=2", *common)
    first.train()
    from dgg.run_io import load_run_config
    from dgg.trainer import GRPOTrainer

    resumed = GRPOTrainer(load_run_config(first.run_dir, ["train.max_batches=4"]), task=DigitTask(),
                          resume_from=first.run_dir)
    resumed.train()
    assert strip_timing(read_metrics(resumed.run_dir)) == strip_timing(read_metrics(whole.run_dir))
    assert resumed.rule.stops_by_reason == whole.rule.stops_by_reason
    assert sum(whole.rule.stops_by_reason.values()) > 0, whole.rule.stops_by_reason  # the rule did act


def test_replay_of_a_fixed_run_finds_the_live_rules_first_stop(tiny_model_dir, tmp_path, capsys):
    """Screening: replaying kl on a fixed-K log stops where a live kl run stopped (exact up to that stop)."""
    common = ["reuse.max_reuse=4", "train.max_batches=3", "eval.every=0", "reuse.target_kl=0.0005"]
    fixed = make_trainer(tiny_model_dir, tmp_path / "fixed", "reuse.mode=fixed", *common)
    fixed.train()
    live = make_trainer(tiny_model_dir, tmp_path / "live", "reuse.mode=dgg", "reuse.rule=kl", *common)
    live.train()
    live_stops = [r for r in read_metrics(live.run_dir) if r["kind"] == "update" and r["reuse/stop"]]
    assert live_stops, "the test needs the live kl run to stop at least once"
    replayed = replay(read_metrics(fixed.run_dir), make_rule("kl", RuleSettings(target_kl=0.0005)))
    assert (replayed[0]["batch"], replayed[0]["reuse_index"]) == (live_stops[0]["batch"],
                                                                 live_stops[0]["reuse_index"])
    assert replayed[0]["exact"] and all(not s["exact"] for s in replayed[1:])

    assert cli_main(["replay", str(fixed.run_dir), "--rule", "kl", "--set", "target_kl=0.0005"]) == 0
    table = capsys.readouterr().out
    assert f"batch {live_stops[0]['batch']}, k = {live_stops[0]['reuse_index']}" in table
    assert "exact only up to each rule's first stop" in table
    assert cli_main(["replay", str(fixed.run_dir / "metrics.jsonl"), "--rule", "kl", "--set", "target_kl=0.0005"]) == 0
    assert f"batch {live_stops[0]['batch']}, k = {live_stops[0]['reuse_index']}" in capsys.readouterr().out
    assert cli_main(["replay", str(fixed.run_dir), "--set", "target_kl"]) == 2
    assert cli_main(["replay", str(tmp_path / "nowhere")]) == 2


def test_nan_energy_is_skipped_as_non_finite_by_the_trainer_not_by_a_rule(tiny_model_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_model_dir, tmp_path, "reuse.mode=dgg", "reuse.rule=dgg+nosignal", "eval.every=0")
    batch = trainer.collect_rollouts()
    monkeypatch.setattr(trainer.probe, "energy", lambda: torch.tensor(math.nan))
    assert trainer.update(batch, 1) is False
    assert trainer.state.nonfinite_skips == 1 and trainer.rule.stops_by_reason == {}
    assert read_metrics(trainer.run_dir)[-1]["reuse/stop_reason"] == "non_finite_grad"
