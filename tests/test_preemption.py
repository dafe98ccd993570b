"""Tests for src/dgg/preemption.py as the trainer uses it: SIGTERM and SIGINT end a run between two update
attempts with a checkpoint, and ``--resume`` continues it bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from dgg.cli import main as cli_main
from dgg.experiments import Arm, run_arm
from dgg.preemption import RunStopped, stop_requested, stop_signals
from dgg.run_io import load_run_config
from dgg.trainer import GRPOTrainer
from fault_harness import (
    RUN,
    Digits,
    checkpoint_loads,
    deterministic,
    final_weights,
    read_records,
    trainer_for,
)

MINI = ["reuse.mode=fixed", "reuse.max_reuse=2", "reuse.mini_batches=2", "train.max_batches=4",
        "train.checkpoint_every=0", "train.checkpoint_minutes=0"]


def saved_state(run_dir):
    return torch.load(run_dir / "checkpoint" / "trainer_state.pt", weights_only=True)


def same_run(run_dir, reference) -> bool:
    weights, expected = final_weights(run_dir), final_weights(reference)
    return deterministic(read_records(run_dir)) == deterministic(read_records(reference)) and \
        weights.keys() == expected.keys() and all(weights[k].equal(expected[k]) for k in weights)


def signal_at_attempt(trainer, attempt: int, signum=signal.SIGTERM):
    """Send ``signum`` to this process while update attempt number ``attempt`` is in flight."""
    real_backward = trainer._backward

    def backward(batch, observers):
        if trainer.state.attempts == attempt:
            os.kill(os.getpid(), signum)
        return real_backward(batch, observers)

    trainer._backward = backward


def resume(run_dir):
    resumed = GRPOTrainer(load_run_config(run_dir), task=Digits(), resume_from=run_dir)
    resumed.train()
    return resumed


def test_the_first_signal_only_sets_the_flag_nested_blocks_share_it_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals() as flag:
        assert not flag.requested and not stop_requested()
        with stop_signals() as inner:
            os.kill(os.getpid(), signal.SIGTERM)
            assert inner is flag and flag.requested and flag.name == "SIGTERM" and stop_requested()
        assert stop_requested()  # the inner block's end neither clears the flag nor restores the handler
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before and not stop_requested()
    with stop_signals() as flag:
        assert not flag.requested  # a new outermost block starts clear
    assert RunStopped(signal.SIGTERM, "d", "m").exit_code == 143 and RunStopped(signal.SIGINT, "d", "m").exit_code == 130


@pytest.mark.parametrize("attempt", [1, 2, 3, 4])  # batch 1: pass 1 mini-batch 0, 1; pass 2 mini-batch 0, 1
def test_sigterm_inside_a_batch_finishes_the_update_and_resumes_bit_identically(tiny_model_dir, tmp_path, attempt):
    trainer_for(tiny_model_dir, tmp_path / "alone", *MINI).train()
    trainer = trainer_for(tiny_model_dir, tmp_path / "run", *MINI)
    signal_at_attempt(trainer, attempt)
    where = f"inside batch 1, after update {attempt}" if attempt < 4 else "after batch 1"
    with pytest.raises(RunStopped, match=f"stopped by SIGTERM {where};") as stopped:
        trainer.train()
    assert stopped.value.exit_code == 143
    assert trainer.state.attempts == attempt  # the update in flight completed, and no other began
    pending = saved_state(tmp_path / "run")["pending"]
    if attempt < 4:  # the checkpoint says where the next attempt starts
        assert (pending["reuse_index"], pending["mini_batch"]) == [(1, 1), (2, 0), (2, 1)][attempt - 1]
    else:  # the batch's last attempt: the batch ended, and the stop came before batch 2
        assert pending is None and saved_state(tmp_path / "run")["state"]["batch"] == 1
    resume(tmp_path / "run")
    assert same_run(tmp_path / "run", tmp_path / "alone")


def test_sigint_after_rollouts_before_the_first_update_keeps_the_batch(tiny_model_dir, tmp_path):
    trainer_for(tiny_model_dir, tmp_path / "alone", "train.max_batches=2").train()
    trainer = trainer_for(tiny_model_dir, tmp_path / "run", "train.max_batches=2")
    real_collect = trainer.collect_rollouts

    def collect():
        batch = real_collect()
        os.kill(os.getpid(), signal.SIGINT)  # lands during generation and scoring
        return batch

    trainer.collect_rollouts = collect
    with pytest.raises(RunStopped, match="SIGINT inside batch 1, after update 0") as stopped:
        trainer.train()
    assert stopped.value.exit_code == 130
    pending = saved_state(tmp_path / "run")["pending"]
    assert (pending["reuse_index"], pending["mini_batch"]) == (1, 0) and pending["batch"]["old_logprobs"] is None
    resume(tmp_path / "run")
    assert same_run(tmp_path / "run", tmp_path / "alone")


def test_sigterm_during_a_checkpoint_write_completes_it_then_stops(tiny_model_dir, tmp_path, monkeypatch):
    overrides = ("train.max_batches=4", "train.checkpoint_every=2")
    trainer_for(tiny_model_dir, tmp_path / "alone", *overrides).train()
    trainer = trainer_for(tiny_model_dir, tmp_path / "run", *overrides)
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if trainer.state.batch == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr("dgg.run_io.torch.save", save)
    with pytest.raises(RunStopped, match="SIGTERM after batch 2"):
        trainer.train()
    monkeypatch.setattr("dgg.run_io.torch.save", real_save)
    state = saved_state(tmp_path / "run")
    assert state["state"]["batch"] == 2 and state["pending"] is None  # written whole, and not written twice
    resume(tmp_path / "run")
    assert same_run(tmp_path / "run", tmp_path / "alone")


def test_a_second_signal_during_a_checkpoint_write_aborts_and_the_previous_checkpoint_survives(tiny_model_dir,
                                                                                              tmp_path):
    args = ["--model", str(tiny_model_dir), *RUN, "train.max_batches=4", "train.checkpoint_every=1",
            "task.test_size=4"]
    assert cli_main(["train", *args, "--output", str(tmp_path / "alone")]) == 0
    run_dir = tmp_path / "run"
    script = (  # two SIGTERMs inside the batch-2 checkpoint's state write: the second one kills at once
        "import os, signal, sys, torch\n"
        "import dgg.run_io as run_io\n"
        "real = torch.save\n"
        "def save(obj, path, *a, **k):\n"
        "    if obj['state']['batch'] == 2:\n"
        "        os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(obj, path, *a, **k)\n"
        "run_io.torch.save = save\n"
        "from dgg.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    aborted = subprocess.run([sys.executable, "-c", script, "train", *args, "--output", str(run_dir)],
                             capture_output=True, text=True, timeout=300)
    assert aborted.returncode == -signal.SIGTERM, aborted.stderr[-2000:]
    assert checkpoint_loads(run_dir) and saved_state(run_dir)["state"]["batch"] == 1
    assert cli_main(["train", "--resume", str(run_dir)]) == 0
    assert same_run(run_dir, tmp_path / "alone")


def test_the_cli_prints_one_line_and_exits_143(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from dgg.trainer import GRPOTrainer as Trainer

    real_update = Trainer.update

    def update(self, batch, reuse_index):
        if self.state.attempts == 0:  # attempt 1 is in flight
            os.kill(os.getpid(), signal.SIGTERM)
        return real_update(self, batch, reuse_index)

    monkeypatch.setattr(Trainer, "update", update)
    run_dir = tmp_path / "run"
    code = cli_main(["train", "--model", str(tiny_model_dir), *RUN, "train.max_batches=3", "--output",
                     str(run_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 143
    assert err[-1] == (f"dgg train: stopped by SIGTERM inside batch 1, after update 1; checkpoint saved in "
                       f"{run_dir / 'checkpoint'}; continue with dgg train --resume {run_dir}")


def test_a_signal_after_the_last_checkpoint_exits_0_and_says_there_is_nothing_to_resume(tiny_model_dir, tmp_path,
                                                                                        capsys, monkeypatch):
    from dgg.trainer import GRPOTrainer as Trainer

    real_save = Trainer.save_checkpoint

    def save_checkpoint(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        if self.state.batch == 2:  # the run's last checkpoint is on disk; no stop point follows
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_checkpoint)
    run_dir = tmp_path / "run"
    code = cli_main(["train", "--model", str(tiny_model_dir), *RUN, "train.max_batches=2", "--output",
                     str(run_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and saved_state(run_dir)["state"]["batch"] == 2
    assert err[-1] == "dgg train: SIGTERM came after the work had finished; nothing to resume"


def test_a_bench_arm_stopped_by_sigterm_continues_where_it_stopped(tiny_model_dir, tmp_path, monkeypatch):
    from dgg.trainer import GRPOTrainer as Trainer

    arm = Arm("fixed", "naive", ("reuse.mode=fixed", "reuse.max_reuse=2"))
    common = [f"model.path={tiny_model_dir}", *RUN[:-3], "train.threads=1", "output.progress=false",
              "train.max_batches=3", "eval.every=1", "eval.problems=4", "eval.samples=1"]
    run_arm(None, common, arm, 0, tmp_path / "alone")
    real_update = Trainer.update

    def update(self, batch, reuse_index):
        if self.state.attempts == 2:  # attempt 3 is in flight: batch 2's first
            os.kill(os.getpid(), signal.SIGTERM)
        return real_update(self, batch, reuse_index)

    monkeypatch.setattr(Trainer, "update", update)
    with pytest.raises(RunStopped):
        run_arm(None, common, arm, 0, tmp_path / "out")
    run_dir = tmp_path / "out" / "fixed" / "seed0"
    assert not (run_dir / "done.json").exists() and saved_state(run_dir)["pending"] is not None
    monkeypatch.setattr(Trainer, "update", real_update)
    run_arm(None, common, arm, 0, tmp_path / "out")  # the same command again
    assert (run_dir / "done.json").is_file()
    assert same_run(run_dir, tmp_path / "alone" / "fixed" / "seed0")


def test_a_signal_between_two_bench_arms_starts_no_other_arm(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import dgg.experiments as experiments

    real_train_arm = experiments._train_arm

    def train_arm_then_signal(*args, **kwargs):
        real_train_arm(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # lands after the arm finished, before the next one

    monkeypatch.setattr(experiments, "_train_arm", train_arm_then_signal)
    out = tmp_path / "bench"
    code = cli_main(["bench", "main", "--seeds", "1", "--arms", "single,fixed_k4", "--out", str(out),
                     f"model.path={tiny_model_dir}", "train.max_batches=1", "rollout.prompts_per_batch=2",
                     "rollout.group_size=2", "rollout.max_new_tokens=2", "eval.every=0", "output.progress=false",
                     "train.threads=1", "profile.weights_every=0"])
    assert code == 143
    assert (out / "single" / "seed0" / "done.json").is_file() and not (out / "fixed_k4").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "stopped by SIGTERM before fixed_k4 seed 0; continue with the same command")
