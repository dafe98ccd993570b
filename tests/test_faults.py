"""Fault injection, readable in one sitting: kills, a full or read-only disk while checkpointing, non-finite
steps, rewards that misbehave, and a corrupt file of every kind a run persists. Nothing is lost, nothing bad is
applied, and every corrupt file is named."""

import errno
import math
import shutil
import signal

import pytest
import torch

from dgg.cli import main as cli_main
from dgg.run_io import load_run_config
from dgg.tasks import Problem, safe_reward
from dgg.trainer import GRPOTrainer
from fault_harness import RUN, Digits, deterministic, kill_and_resume, read_records, trainer_for


def optimizer_snapshot(trainer):
    return {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for p, s in trainer.optimizer.state.items()}


def test_kill_9_at_random_moments_then_resume_equals_a_run_left_alone(tiny_model_dir, tmp_path):
    args = ["--model", str(tiny_model_dir), *RUN, "train.max_batches=12", "train.checkpoint_every=1",
            "task.test_size=4"]
    assert cli_main(["train", *args, "--output", str(tmp_path / "alone")]) == 0
    report = kill_and_resume(args, tmp_path / "killed", tmp_path / "alone", kills=3, seed=0, max_delay_s=0.5)
    assert report.corrupt == [] and report.identical, report
    assert report.kills >= 1 and report.resumes >= 1, report  # kills landed after training began


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_at_random_moments_then_resume_equals_a_run_left_alone(tiny_model_dir, tmp_path, sig):
    args = ["--model", str(tiny_model_dir), *RUN, "train.max_batches=12", "train.checkpoint_every=4",
            "reuse.mini_batches=2", "task.test_size=4"]
    assert cli_main(["train", *args, "--output", str(tmp_path / "alone")]) == 0
    report = kill_and_resume(args, tmp_path / "stopped", tmp_path / "alone", kills=3, seed=1, max_delay_s=0.5,
                             sig=sig)
    assert report.corrupt == [] and report.identical, report
    assert report.clean_stops >= 1 and report.clean_stops + report.after_the_end == report.kills, report


# torch.save and safetensors report a full disk as their own errors, not as OSError (seen on a real full disk:
# "basic_ios::clear: iostream error", then "unexpected pos ..." from torch's zip writer).
FAILURES = {"ENOSPC": lambda path: OSError(errno.ENOSPC, "No space left on device", str(path)),
            "EROFS": lambda path: OSError(errno.EROFS, "Read-only file system", str(path)),
            "torch's own": lambda path: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_full_or_read_only_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path,
                                                                                     monkeypatch, failure):
    trainer = trainer_for(tiny_model_dir, tmp_path / "run", "train.max_batches=3", "train.checkpoint_every=1")
    real_save = torch.save

    def save_then_fail(obj, path, *a, **k):
        if trainer.state.batch == 2:  # the second checkpoint dies half-written
            raise FAILURES[failure](path)
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr("dgg.run_io.torch.save", save_then_fail)
    with pytest.raises(OSError, match="could not write a checkpoint .*the previous checkpoint in .* is intact"):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoint.tmp").exists()  # the partial write does not keep the disk full
    state = torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["state"]["batch"] == 1  # the last good checkpoint survived
    monkeypatch.setattr("dgg.run_io.torch.save", real_save)
    resumed = GRPOTrainer(load_run_config(tmp_path / "run"), task=Digits(), resume_from=tmp_path / "run")
    resumed.train()
    assert resumed.state.batch == 3
    assert cli_main(["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "ro"), *RUN,
                     "train.max_batches=1"]) == 0  # and the CLI names an OS error in one line (test_errors.py)


def test_a_checkpoint_that_cannot_be_written_is_one_line_from_the_cli(tiny_model_dir, tmp_path, monkeypatch,
                                                                       capsys):
    def full_disk(obj, path, *a, **k):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr("dgg.run_io.torch.save", full_disk)
    code = cli_main(["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"), *RUN,
                     "train.max_batches=1", "train.checkpoint_every=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "could not write a checkpoint (RuntimeError: basic_ios::clear: iostream error;" in err[0]
    assert "no earlier checkpoint exists" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("reuse_index", [1, 2])
@pytest.mark.parametrize("what", ["loss", "grad"])
def test_a_non_finite_step_is_never_applied_and_is_counted(tiny_model_dir, tmp_path, reuse_index, what):
    trainer = trainer_for(tiny_model_dir, tmp_path / "run", "eval.every=0")
    batch = trainer.collect_rollouts()
    for k in range(1, reuse_index):
        assert trainer.update(batch, k)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    adam = optimizer_snapshot(trainer)
    real_backward = trainer._backward

    def poisoned(b, observers):
        loss = real_backward(b, observers)
        if what == "grad":
            next(trainer.model.parameters()).grad.view(-1)[0] = math.nan
            return loss
        return math.nan

    trainer._backward = poisoned
    assert trainer.update(batch, reuse_index) is False  # and reuse of this batch ends
    assert trainer.state.nonfinite_skips == 1
    assert all(torch.equal(p, weights[n]) for n, p in trainer.model.named_parameters())
    after = optimizer_snapshot(trainer)
    assert after.keys() == adam.keys() and all(
        all(torch.equal(v, adam[i][k]) if torch.is_tensor(v) else v == adam[i][k] for k, v in s.items())
        for i, s in after.items())


class Misbehaving:
    name, isolate_reward = "misbehaving", True

    def problem(self, split, index):
        return Problem(prompt="1+1=", answer="2", meta={})

    def split_size(self, split):
        return 4

    def reward(self, completion, answer):
        if completion == "raise":
            raise RuntimeError("boom")
        if completion == "hang":
            import time

            time.sleep(60)
        if completion == "nan":
            return math.nan, {}
        return 1.0, {}


@pytest.mark.parametrize("completion, error", [("raise", "RuntimeError: boom"), ("hang", "timeout"),
                                               ("nan", "outside [0, 1]")])
def test_a_reward_that_raises_hangs_or_returns_nan_costs_one_sample(completion, error):
    reward, info = safe_reward(Misbehaving(), completion, "2", timeout_s=2.0)
    assert reward == 0.0 and error in info["error"]
    assert safe_reward(Misbehaving(), "fine", "2", timeout_s=10.0) == (1.0, {})  # and the next one is scored


def _truncate(path):
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


CORRUPTIONS = {
    "config.yaml": (lambda run: (run / "config.yaml").write_text("model: [unclosed\n"), "not valid YAML"),
    "metrics.jsonl": (lambda run: (run / "metrics.jsonl").write_bytes(b"\xff\xfe\n"), "not UTF-8"),
    "trainer_state.pt": (lambda run: _truncate(run / "checkpoint" / "trainer_state.pt"), "trainer_state.pt"),
    "model.safetensors": (lambda run: _truncate(run / "checkpoint" / "model.safetensors"), "corrupt or truncated"),
    "tokenizer.json": (lambda run: (run / "checkpoint" / "tokenizer.json").write_text("{"), "tokenizer"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_file_of_each_kind_is_named_on_resume(tiny_model_dir, tmp_path, capsys, kind):
    run = tmp_path / "run"
    assert cli_main(["train", "--model", str(tiny_model_dir), "--output", str(run), *RUN, "train.max_batches=1",
                     "task.test_size=4"]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    corrupt, expected = CORRUPTIONS[kind]
    corrupt(run)
    command = ["replay", str(run)] if kind == "metrics.jsonl" else ["train", "--resume", str(run),
                                                                     "train.max_batches=2"]
    assert cli_main(command) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    untouched = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != kind}
    assert all(before[name] == data for name, data in untouched.items() if name in before)  # nothing else lost


def test_a_corrupt_experiment_or_done_file_is_named(tmp_path, capsys):
    (tmp_path / "experiment.json").write_bytes(b"\xff")
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "experiment.json is not UTF-8" in capsys.readouterr().err


def test_kill_harness_notices_a_difference(tiny_model_dir, tmp_path):
    """The harness itself can fail: a run with another seed is not identical to the reference."""
    args = ["--model", str(tiny_model_dir), *RUN, "train.max_batches=2", "task.test_size=4"]
    assert cli_main(["train", *args, "--output", str(tmp_path / "alone")]) == 0
    report = kill_and_resume([*args, "train.seed=1"], tmp_path / "other", tmp_path / "alone", kills=0, seed=0)
    assert not report.identical and "metrics differ from the uninterrupted run" in report.corrupt
    assert deterministic(read_records(tmp_path / "alone"))  # the reference has records at all
    shutil.rmtree(tmp_path / "other")


def test_code_shipped_with_a_model_directory_never_runs(tiny_model_dir, tmp_path):
    """trust_remote_code stays off: a config.json that points at a module of its own loads the built-in class."""
    import json

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "pwned"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                   "from transformers import Qwen2ForCausalLM\nclass Evil(Qwen2ForCausalLM): pass\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Evil", "AutoTokenizer": ["evil.Evil", None]}
    (model / "config.json").write_text(json.dumps(config))
    assert cli_main(["train", "--model", str(model), "--output", str(tmp_path / "run"), *RUN, "train.max_batches=1",
                     "task.test_size=4"]) == 0
    assert not marker.exists()
