"""Rewards for a rollout batch (Algorithm 1, line 2's scores): each completion's reward from the task, in its
sandbox; every failure written to ``reward_errors.jsonl``; and the stop when every reward keeps failing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from dgg.config import ConfigError
from dgg.rollout import RolloutBatch
from dgg.tasks import TaskConfig, safe_reward

log = logging.getLogger("dgg.scoring")


class RewardsFailing(ConfigError):
    """Every reward failed for task.max_failed_batches batches in a row: the run stops, the user fixes it."""


class BatchScorer:
    """Scores rollout batches for one run; ``errors_path`` is the run's ``reward_errors.jsonl``."""

    def __init__(self, task, config: TaskConfig, errors_path: Path, run_dir: Path, device):
        self.task, self.config, self.errors_path, self.run_dir, self.device = task, config, errors_path, run_dir, device

    def score(self, batch: RolloutBatch, state) -> None:
        """``batch.rewards`` from the task (episodes come scored by their environment: their failures are only
        logged); ``state`` (a RunState) counts the errors and the batches on which every reward failed."""
        if batch.rewards is None:
            errors = self._score_completions(batch, state)
        else:
            errors = self._log_environment_errors(batch, state)
        self._check_alive(errors, batch.size, state)

    def _score_completions(self, batch: RolloutBatch, state) -> list[str]:
        rewards, errors = [], []
        for problem, text in zip(batch.problems, batch.completions):
            reward, info = safe_reward(self.task, text, problem.answer, self.config.reward_timeout_s, problem)
            if "error" in info:
                errors.append(info["error"])
                log.warning("reward failed (%s) on prompt %r, completion %r", info["error"], problem.prompt, text)
                self._record(state, {"prompt": problem.prompt, "completion": text, "answer": problem.answer,
                                     "error": info["error"]})
            rewards.append(float(reward))
            batch.reward_infos.append(info)
        batch.rewards = torch.tensor(rewards, device=self.device)
        return errors

    def _log_environment_errors(self, batch: RolloutBatch, state) -> list[str]:
        errors = [info["env_error"] for info in batch.reward_infos if info.get("env_error")]
        for problem, info in zip(batch.problems, batch.reward_infos):
            if info.get("env_error"):
                log.warning("environment failed (%s) in episode %s", info["env_error"], problem.meta.get("env_seed"))
                self._record(state, {"prompt": problem.prompt, "episode_seed": problem.meta.get("env_seed"),
                                     "error": info["env_error"]})
        return errors

    def _record(self, state, entry: dict) -> None:
        state.reward_errors += 1
        with open(self.errors_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"batch": state.batch, **entry}) + "\n")

    def _check_alive(self, errors: list[str], samples: int, state) -> None:
        """A reward that fails on every sample teaches nothing: after task.max_failed_batches such batches in a
        row, stop before anything is trained on them (the last checkpoint stays as it was)."""
        state.failed_reward_batches = state.failed_reward_batches + 1 if len(errors) == samples else 0
        limit = self.config.max_failed_batches
        if limit and state.failed_reward_batches >= limit:
            raise RewardsFailing(
                f"every reward failed on {limit} batches in a row (task.max_failed_batches), last error: "
                f"{errors[-1]}. Nothing was trained on them; {self.errors_path} lists each failure. Fix "
                f"the reward, then continue with --resume {self.run_dir} (its last checkpoint is kept)")
