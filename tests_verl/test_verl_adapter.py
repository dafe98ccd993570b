"""dgg.integrations.verl against the real verl package: its actor update loop on CPU (see cpu_verl.py).

Run with ``make test-verl`` (its own environment, .venv-verl: verl pins transformers and tensordict)."""

import os

import cpu_verl  # noqa: F401  (installs the CPU platform before verl builds anything)
import pytest
import torch
from cpu_verl import build_worker, full_state, init_gloo, rollout_batch
from verl.utils import tensordict_utils as tu
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

from dgg.errors import UserError
from dgg.integrations import verl as dgg_verl
from dgg.integrations.verl import (
    DGGTrainingWorker,
    mini_batches_per_epoch,
    reuse_index,
    settings_from_environment,
)
from dgg.reuse_rules import RuleSettings

EPOCHS = 2  # ppo_epochs = K; 8 samples in mini-batches of 4: two optimizer steps per epoch


@pytest.fixture(scope="module", autouse=True)
def _gloo():
    init_gloo()


def _train(worker, batches: int, epochs: int = EPOCHS):
    metrics = []
    for seed in range(batches):
        metrics.append(tu.get(worker.train_mini_batch(rollout_batch(seed, epochs)), "metrics"))
    return metrics


def _adam(worker):
    state = worker.engine.optimizer.state
    return [(s["step"].clone(), s["exp_avg"].full_tensor().clone()) for s in state.values()] if state else []


def test_importing_the_module_installs_the_worker():
    assert ActorRolloutRefWorker.actor_worker_cls is DGGTrainingWorker
    dgg_verl.install()
    assert ActorRolloutRefWorker.actor_worker_cls is DGGTrainingWorker


def test_reuse_index_is_the_epoch_of_the_step():
    assert [reuse_index(i, 2) for i in range(6)] == [1, 1, 2, 2, 3, 3]
    assert [reuse_index(i, 1) for i in range(3)] == [1, 2, 3]
    assert mini_batches_per_epoch(8, mini_batch_size=4, num_mini_batch=None, data_parallel_size=1) == 2
    assert mini_batches_per_epoch(8, mini_batch_size=4, num_mini_batch=None, data_parallel_size=2) == 4
    assert mini_batches_per_epoch(8, mini_batch_size=None, num_mini_batch=2, data_parallel_size=1) == 2


def test_settings_come_from_named_environment_variables():
    spec, settings, tied = settings_from_environment({"DGG_RULE": "dgg+nosignal", "DGG_TAU": "0.1",
                                                      "DGG_WINDOW": "5", "DGG_SIGNAL_FLOOR": "1e-4"})
    assert spec == "dgg+nosignal" and tied == "output"
    assert settings == RuleSettings(tau=0.1, window=5, signal_floor=1e-4)
    assert settings_from_environment({}) [:2] == ("dgg", RuleSettings())


@pytest.mark.parametrize("environ, message", [
    ({"DGG_RULE": "dgx"}, "DGG_RULE: unknown reuse rule 'dgx'; valid rules: dgg"),
    ({"DGG_TAU": "half"}, "DGG_TAU='half' is not a valid float"),
    ({"DGG_WINDOW": "2.5"}, "DGG_WINDOW='2.5' is not a valid int"),
    ({"DGG_RULE": "kl"}, "needs DGG_KL_ESTIMATOR=k1"),
    ({"DGG_RULE": "m2"}, "valid under verl: dgg, kl, clip, nosignal, gradnorm, none"),
    ({"DGG_FRESH_DROP": "skip"}, "DGG_FRESH_DROP: fresh_drop must be one of end_batch, skip_step"),
])
def test_bad_settings_name_the_variable(environ, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings_from_environment(environ)


def test_tau_infinity_is_bitwise_stock_verl(tiny_model_dir):
    stock = build_worker(tiny_model_dir, TrainingWorker)
    stock_metrics = _train(stock, 3)
    gated = build_worker(tiny_model_dir, DGGTrainingWorker, settings=RuleSettings(tau=float("inf"), window=2))
    gated_metrics = _train(gated, 3)
    expected, got = full_state(stock), full_state(gated)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert [m["grad_norm"] for m in gated_metrics] == [m["grad_norm"] for m in stock_metrics]
    assert [m["lr"] for m in gated_metrics] == [m["lr"] for m in stock_metrics]
    assert [m["reuse_index"] for m in gated_metrics] == [[1, 1, 2, 2]] * 3
    assert sum(sum(m["reuse/stop"]) for m in gated_metrics) == 0


def test_watch_only_is_bitwise_stock_verl_and_logs_where_the_rule_would_stop(tiny_model_dir, monkeypatch):
    stock = build_worker(tiny_model_dir, TrainingWorker)
    _train(stock, 2)
    monkeypatch.setenv("DGG_WATCH_ONLY", "1")
    watch = build_worker(tiny_model_dir, DGGTrainingWorker, rule_spec="clip",
                         settings=RuleSettings(target_clip=1e-12))  # would stop at every reuse step that clips
    metrics = _train(watch, 2)
    expected, got = full_state(stock), full_state(watch)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert [m["reuse/stop"] for m in metrics] == [[0.0] * 4] * 2 and all("reuse/skipped" not in m for m in metrics)
    assert [m["reuse/would_stop"][:2] for m in metrics] == [[0.0, 0.0]] * 2  # never at k = 1
    assert sum(sum(m["reuse/would_stop"][2:]) for m in metrics) > 0  # the rule did want to stop
    assert watch.dgg_controller.watch_only and watch.dgg_rule.stops_by_reason == {}
    with pytest.raises(UserError, match="DGG_WATCH_ONLY"):
        dgg_verl.watch_only_from_environment({"DGG_WATCH_ONLY": "maybe"})


class _CountForwards:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._count)

    def _count(self, *args):
        self.calls += 1


def test_a_drop_happens_before_the_optimizer_and_ends_reuse_of_the_batch(tiny_model_dir):
    # τ = -1e9: every reuse step (k > 1) is an anomaly once the window (W = 2 increments) is full.
    worker = build_worker(tiny_model_dir, DGGTrainingWorker, settings=RuleSettings(tau=-1e9, window=2))
    stock = build_worker(tiny_model_dir, TrainingWorker)
    first = _train(worker, 1)[0]  # steps 2 and 3 bring the window's two increments; step 4 is gated
    assert first["reuse/stop"] == [0.0, 0.0, 0.0, 1.0] and "reuse/skipped" not in first
    _train(stock, 1)
    adam_before, state_before = _adam(worker), full_state(worker)

    counter = _CountForwards(worker.engine.module)
    batch = worker.train_mini_batch(rollout_batch(7, EPOCHS))
    metrics = tu.get(batch, "metrics")
    counter.handle.remove()
    # k = 1 steps are applied (two mini-batches), the first k = 2 step is dropped, the last one never runs
    assert metrics["reuse_index"] == [1, 1, 2] and metrics["reuse/stop"] == [0.0, 0.0, 1.0]
    assert metrics["gate/discard"] == [0.0, 0.0, 1.0] and metrics["reuse/skipped"] == [1.0]
    assert counter.calls == 3 * 2  # 3 mini-batches of 2 micro-batches each reached the model
    assert all(p.grad is None for p in worker.engine.module.parameters())
    adam_after = _adam(worker)
    assert [int(step) for step, _ in adam_after] == [int(step) + 2 for step, _ in adam_before]
    # the LR schedule moves as verl moves it: once per rollout batch, whatever was dropped
    assert worker.engine.lr_scheduler.last_epoch == 2 and metrics["lr"] == [worker.engine.lr_scheduler.get_last_lr()[0]]
    assert any(not torch.equal(state_before[n], v) for n, v in full_state(worker).items())  # k = 1 did train
    assert worker.dgg_rule.state_dict()["stops_by_reason"] == {"dgg:zscore": 2}


@pytest.mark.parametrize("fresh_drop", ["end_batch", "skip_step"])
def test_a_drop_on_a_fresh_mini_batch_ends_the_batch_or_skips_that_step_alone(tiny_model_dir, fresh_drop):
    worker = build_worker(tiny_model_dir, DGGTrainingWorker, rule_spec="none",
                          settings=RuleSettings(fresh_drop=fresh_drop))
    decide, calls = worker.dgg_controller.decide, []

    def first_gradient_non_finite(reuse_index, energy, grad_norm=None):
        calls.append(1)
        return decide(reuse_index, float("nan") if len(calls) == 1 else energy, grad_norm)

    worker.dgg_controller.decide = first_gradient_non_finite
    metrics = _train(worker, 1)[0]
    if fresh_drop == "end_batch":  # the batch's other fresh mini-batch and its reuse pass never run
        assert metrics["reuse_index"] == [1] and metrics["actor/applied"] == [0.0]
        assert metrics["reuse/skipped"] == [1.0, 1.0, 1.0]
    else:  # only the first step is dropped
        assert metrics["reuse_index"] == [1, 1, 2, 2] and metrics["actor/applied"] == [0.0, 1.0, 1.0, 1.0]
        assert metrics["reuse/step_skipped"] == [1.0, 0.0, 0.0, 0.0] and "reuse/skipped" not in metrics
    adam = _adam(worker)  # AdamW took a step for each applied update only
    assert (int(adam[0][0]) if adam else 0) == (0 if fresh_drop == "end_batch" else 3)


def test_a_dropped_step_leaves_adam_bit_identical(tiny_model_dir):
    """The same batch with the drop and with the reuse pass cut off by hand (ppo_epochs = 1) leaves the same
    weights and the same Adam moments: the dropped step reached nothing."""
    dropping = build_worker(tiny_model_dir, DGGTrainingWorker, settings=RuleSettings(tau=-1e9, window=2))
    single = build_worker(tiny_model_dir, TrainingWorker)
    for seed in (0, 1):  # fill the window (W = 2) with k = 1 steps only
        dropping.train_mini_batch(rollout_batch(seed, epochs=1))
        single.train_mini_batch(rollout_batch(seed, epochs=1))
    metrics = tu.get(dropping.train_mini_batch(rollout_batch(2, epochs=2)), "metrics")
    single.train_mini_batch(rollout_batch(2, epochs=1))
    assert metrics["reuse/stop"] == [0.0, 0.0, 1.0]
    assert all(torch.equal(a, b) for a, b in zip(full_state(dropping).values(), full_state(single).values()))
    for (step_a, avg_a), (step_b, avg_b) in zip(_adam(dropping), _adam(single)):
        assert torch.equal(step_a, step_b) and torch.equal(avg_a, avg_b)


@pytest.mark.parametrize("settings", [RuleSettings(target_clip=1e-6), RuleSettings(target_kl=1e-6, kl_estimator="k1")],
                         ids=["clip", "kl"])
def test_kl_and_clip_rules_read_verls_own_loss_metrics(tiny_model_dir, settings):
    """The batch's π_old is off the policy (ratios far from 1), so at k = 2 both signals exceed any small target."""
    rule = "clip" if settings.target_clip == 1e-6 else "kl"
    worker = build_worker(tiny_model_dir, DGGTrainingWorker, rule_spec=rule, settings=settings)
    metrics = _train(worker, 1)[0]
    assert metrics["reuse/stop"] == [0.0, 0.0, 1.0] and metrics["gate/discard"] == [0.0, 0.0, 0.0]
    assert worker.dgg_rule.state_dict()["stops_by_reason"] == {rule: 1}


def test_rule_state_is_saved_beside_verl_checkpoint_and_restored(tiny_model_dir, tmp_path):
    worker = build_worker(tiny_model_dir, DGGTrainingWorker, settings=RuleSettings(tau=0.5, window=2))
    _train(worker, 2)
    worker.save_checkpoint(str(tmp_path / "step2"))
    saved = worker.dgg_rule.state_dict()
    assert (tmp_path / "step2" / dgg_verl.STATE_FILE).exists()
    restored = build_worker(tiny_model_dir, DGGTrainingWorker, settings=RuleSettings(tau=0.5, window=2))
    restored.load_checkpoint(str(tmp_path / "step2"))
    assert restored.dgg_rule.state_dict() == saved
    assert _train(restored, 1)[0]["gate/z"] == _train(worker, 1)[0]["gate/z"]


def test_fsdp1_is_refused_with_a_clear_message(tiny_model_dir, monkeypatch):
    worker = build_worker(tiny_model_dir, DGGTrainingWorker)
    from torch.distributed.fsdp import FullyShardedDataParallel

    monkeypatch.setattr(worker.engine, "module", object.__new__(FullyShardedDataParallel))
    with pytest.raises(UserError, match="strategy=fsdp2"):
        worker.train_mini_batch(rollout_batch(0, EPOCHS))


@pytest.mark.skipif(os.environ.get("DGG_VERL_SKIP_WORLD2") == "1", reason="asked to skip")
def test_two_ranks_take_the_same_decision(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "verl_two_ranks.py")
    result = subprocess.run([sys.executable, script, str(tiny_model_dir), str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    decisions = [open(tmp_path / f"rank{rank}.txt").read() for rank in (0, 1)]
    assert decisions[0] == decisions[1] and "1.0" in decisions[0]  # a drop happened, on both ranks alike


def _reuse_script():
    """tests/reuse_script.py, loaded by path (see conftest.py on why not by package)."""
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "reuse_script.py")
    spec = importlib.util.spec_from_file_location("dgg_reuse_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_verl_path_reaches_the_scripted_verdicts(tiny_model_dir):
    from tensordict import TensorDict

    script = _reuse_script()
    worker = build_worker(tiny_model_dir, DGGTrainingWorker, rule_spec=script.RULE, settings=script.SETTINGS)
    tokens = (3.0, 5.0)
    current = {}

    def verl_loss(model_output, data, dp_group=None):  # verl's loss metrics: k1 KL and the clip fraction
        stats = script.statistics(current["attempt"], current["micro_batch"])
        return torch.tensor(0.0), {"actor/ppo_kl": -stats["log_ratio_mean"], "actor/pg_clipfrac": stats["clip_ratio"]}

    worker.set_loss_fn(verl_loss)
    worker._probe = type("Probe", (), {"energy": lambda self: torch.tensor(current["attempt"].energy)})()
    worker._grad_norm = lambda: current["attempt"].grad_norm
    worker._verl_optimizer_step = lambda: current["attempt"].grad_norm
    verdicts = []
    for attempt in script.SCRIPT:
        current["attempt"] = attempt
        for index, count in enumerate(tokens):  # the micro-batches of one mini-batch
            current["micro_batch"] = index
            data = TensorDict({"response_mask": torch.ones(1, int(count)),
                               "advantages": torch.full((1, int(count)), 1.0 if attempt.has_signal else 0.0)},
                              batch_size=[1])
            worker.loss_fn(None, data)
        worker._step_in_batch, worker._per_epoch = attempt.reuse_index - 1, 1
        worker._gated_optimizer_step()
        verdicts.append(dict(worker._last))
    assert [None if v["actor/applied"] else r for v, r in zip(verdicts, script.EXPECTED_REASONS)] == \
        script.EXPECTED_REASONS
    for metrics, expected in zip(verdicts, script.reference_metrics(tokens), strict=True):
        assert metrics == pytest.approx(expected)
