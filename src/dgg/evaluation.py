"""Held-out accuracy as mean@k (the paper reports mean@16): ``eval.samples`` completions of each of
``eval.problems`` test problems at ``eval.temperature``, on an RNG of its own, so evaluating never changes the
training run's sampling."""

from __future__ import annotations

import torch

from dgg.rollout import render_prompt
from dgg.tasks import safe_reward


@torch.no_grad()
def held_out_accuracy(sampler, task, tokenizer, chat: bool, config, seed: int, device) -> tuple[float, int]:
    """(mean reward, problems evaluated); ``config`` is the run's Config, ``seed`` fixes this evaluation's draws."""
    size = task.split_size("test")
    count = config.eval.problems if size is None else min(config.eval.problems, size)
    problems = [render_prompt(tokenizer, task.problem("test", i), chat) for i in range(count)]
    rewards = []
    chunk = max(1, 512 // config.eval.samples)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, count, chunk):
            batch = sampler.sample(problems[i:i + chunk], config.eval.samples, config.rollout.max_new_tokens,
                                   config.eval.temperature, 1.0)
            if batch.rewards is not None:  # episodes, scored by their environment
                rewards += batch.rewards.tolist()
                continue
            for problem, text in zip(batch.problems, batch.completions):
                rewards.append(float(safe_reward(task, text, problem.answer, config.task.reward_timeout_s,
                                                 problem)[0]))
    return sum(rewards) / len(rewards), count
