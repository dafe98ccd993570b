"""Kill -9 (or SIGTERM, SIGINT) a `dgg train` run at random moments, resume it each time, and compare with a run
left alone.

Used by tests/test_faults.py (a few kills) and benchmarks/fault_injection.py (many, counted in BENCHMARKS.md)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dgg.tasks import Problem

TIMING_KEYS = ("wall_time", "rollout/seconds", "rollout/scoring_seconds")

RUN = ["rollout.prompts_per_batch=2", "rollout.group_size=4", "rollout.max_new_tokens=4", "eval.every=2",
       "eval.problems=2", "eval.samples=1", "output.progress=false", "optim.lr=1e-2", "reuse.mode=dgg",
       "reuse.max_reuse=3", "train.threads=1"]


class Digits:
    name, isolate_reward = "digits", False

    def problem(self, split, index):
        return Problem(prompt=f"{index % 7}+{index % 5}=", answer="", meta={})

    def split_size(self, split):
        return None if split == "train" else 4

    def reward(self, completion, answer):
        return sum(c.isdigit() for c in completion) / max(len(completion), 1), {}


def trainer_for(tiny_model_dir, run_dir, *overrides):
    from dgg.config import load_config
    from dgg.loading import load_policy
    from dgg.trainer import GRPOTrainer

    config = load_config(None, [f"model.path={tiny_model_dir}", f"output.dir={run_dir}", *RUN, *overrides])
    model, tokenizer = load_policy(config.model)
    return GRPOTrainer(config, model, tokenizer, Digits())


def deterministic(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("perf/")} for r in records]


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def dgg_train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dgg.cli", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@dataclass
class KillReport:
    kills: int = 0
    clean_stops: int = 0  # SIGTERM/SIGINT: exited 128 + signal after checkpointing, with the one-line message
    mid_batch_stops: int = 0  # of those, checkpoints that hold a batch in progress
    after_the_end: int = 0  # the signal came after the run's last checkpoint, while the process was exiting
    resumes: int = 0
    restarts_from_scratch: int = 0  # killed before any checkpoint existed
    corrupt: list[str] = field(default_factory=list)  # anything that failed to load or compare
    identical: bool = False


def checkpoint_loads(run_dir: Path) -> bool:
    import torch

    state = run_dir / "checkpoint" / "trainer_state.pt"
    if not state.is_file():
        return not (run_dir / "checkpoint.old").exists() or (run_dir / "checkpoint.old" / "trainer_state.pt").is_file()
    torch.load(state, weights_only=True)
    from safetensors.torch import load_file

    load_file(run_dir / "checkpoint" / "model.safetensors")
    return True


def kill_and_resume(train_args: list[str], run_dir: Path, reference: Path, kills: int, seed: int,
                    max_delay_s: float = 1.0, timeout_s: float = 600, sig: int = signal.SIGKILL) -> KillReport:
    """Start the run, send it ``sig`` ``kills`` times (resuming after each), let it finish, and compare its
    metrics and final weights with the reference run's. Each signal comes a random 0..max_delay_s after the run
    has written a new metrics line, so it lands in training, evaluation or checkpointing rather than in start-up.
    SIGTERM and SIGINT must end the run with exit code 128 + the signal and a one-line message."""
    rng = random.Random(seed)
    report = KillReport()
    deadline = time.monotonic() + timeout_s
    for attempt in range(kills + 1):
        if (run_dir / "config.yaml").is_file():
            args = ["--resume", str(run_dir)]
            if not (run_dir / "checkpoint").is_dir() and not (run_dir / "checkpoint.old").is_dir():
                report.restarts_from_scratch += 1
            report.resumes += 1
        else:
            args = [*train_args, "--output", str(run_dir), "--overwrite"]
        metrics = run_dir / "metrics.jsonl"
        size_at_start = metrics.stat().st_size if metrics.exists() else 0
        process = dgg_train(args)
        if attempt < kills:
            while process.poll() is None and time.monotonic() < deadline and not (
                    metrics.exists() and metrics.stat().st_size > size_at_start):
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, max_delay_s))
            if process.poll() is None:
                process.send_signal(sig)
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
                report.kills += 1
                if sig != signal.SIGKILL:
                    stderr = process.stderr.read()
                    if process.returncode == 128 + sig and "; continue with dgg train --resume" in stderr:
                        report.clean_stops += 1
                        report.mid_batch_stops += holds_a_batch_in_progress(run_dir)
                    elif process.returncode == -sig and run_finished(run_dir):
                        report.after_the_end += 1  # the default action, once dgg had let go of the signal
                    elif process.returncode == 0 and run_finished(run_dir):
                        report.after_the_end += 1  # after the last point where a stop could act, or the exit
                    elif process.returncode != 0:
                        report.corrupt.append(f"signal {sig}: exit {process.returncode}: {stderr[-500:]}")
                try:
                    if not checkpoint_loads(run_dir):
                        report.corrupt.append(f"kill {report.kills}: checkpoint.old without a state file")
                except Exception as err:  # noqa: BLE001 - any failure to load is what we count
                    report.corrupt.append(f"kill {report.kills}: {type(err).__name__}: {err}")
                continue
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
        if process.returncode != 0:
            report.corrupt.append(f"exit {process.returncode}: {process.stderr.read()[-500:]}")
            return report
        break  # it finished before the next kill came
    same_metrics = deterministic(read_records(run_dir)) == deterministic(read_records(reference))
    same_weights = final_weights(run_dir).keys() == final_weights(reference).keys() and all(
        a.equal(b) for a, b in zip(final_weights(run_dir).values(), final_weights(reference).values()))
    report.identical = same_metrics and same_weights
    if not same_metrics:
        report.corrupt.append("metrics differ from the uninterrupted run")
    if not same_weights:
        report.corrupt.append("final weights differ from the uninterrupted run")
    return report


def run_finished(run_dir: Path) -> bool:
    """Whether the checkpoint on disk is the run's last: every batch trained, none in progress."""
    import torch
    import yaml

    state = torch.load(run_dir / "checkpoint" / "trainer_state.pt", weights_only=True)
    wanted = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_batches"]
    return state["state"]["batch"] == wanted and state.get("pending") is None


def holds_a_batch_in_progress(run_dir: Path) -> bool:
    import torch

    return torch.load(run_dir / "checkpoint" / "trainer_state.pt", weights_only=True).get("pending") is not None


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return dict(sorted(load_file(run_dir / "checkpoint" / "model.safetensors").items()))
