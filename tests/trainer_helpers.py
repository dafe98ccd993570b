"""Helpers for tests that train the reference trainer on the tiny model: a digit-counting task, a trainer built
from overrides, and readers of what a run wrote."""

import json

import torch

from dgg.config import load_config
from dgg.loading import load_policy
from dgg.tasks import Problem
from dgg.trainer import GRPOTrainer

TINY_RUN = ["rollout.prompts_per_batch=4", "rollout.group_size=4", "rollout.max_new_tokens=4",
            "eval.every=2", "eval.problems=4", "eval.samples=2", "profile.weights_every=2",
            "output.progress=false", "optim.lr=1e-2"]
TIMING_KEYS = ("wall_time", "rollout/seconds", "rollout/scoring_seconds")


class DigitTask:
    """Reward = fraction of digit characters: a random model gets varied rewards, so gradients are non-zero."""

    name = "digits"
    isolate_reward = False

    def __init__(self, fail_on=None):
        self.fail_on = fail_on

    def problem(self, split, index):
        return Problem(prompt=f"{index % 7}+{index % 5}=", answer="", meta={})

    def split_size(self, split):
        return None if split == "train" else 8

    def reward(self, completion, answer):
        if self.fail_on is not None and self.fail_on in completion:
            raise RuntimeError("reward exploded")
        return (sum(c.isdigit() for c in completion) / max(len(completion), 1)), {}


def make_trainer(tiny_model_dir, tmp_path, *overrides, task=None):
    config = load_config(None, [f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'run'}", *TINY_RUN,
                                *overrides])
    model, tokenizer = load_policy(config.model)
    return GRPOTrainer(config, model, tokenizer, task or DigitTask())


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def optimizer_snapshot(optimizer):
    out = {}
    for i, state in enumerate(optimizer.state.values()):
        for key, value in state.items():
            out[(i, key)] = value.clone() if torch.is_tensor(value) else value
    return out


def strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("perf/")} for r in records]
