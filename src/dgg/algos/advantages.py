"""Advantage estimators: (N,) rewards, the G completions of each prompt adjacent -> (N,) advantages.

A group whose rewards are all equal gets zero advantage under every estimator here."""

from __future__ import annotations

import torch

from dgg.algos.registry import Registry
from dgg.loss import group_advantages

ADVANTAGES = Registry("advantage estimator", "algo.advantage")


@ADVANTAGES.register("grpo")
def grpo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO (Shao et al. 2024; the paper's Eq. 1): (r − mean_group) / (std_group + 1e-6)."""
    return group_advantages(rewards, group_size, scale_by_std=True)


@ADVANTAGES.register("drgrpo")
def drgrpo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): r − mean_group, no division by the std (which favours easy and hard prompts)."""
    return group_advantages(rewards, group_size, scale_by_std=False)


@ADVANTAGES.register("rloo")
def rloo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): r_i − mean of the other G − 1 rewards of the group = G/(G−1)·(r_i − mean)."""
    if group_size < 2:
        raise ValueError("RLOO needs a group of at least 2 completions per prompt (rollout.group_size >= 2)")
    return group_advantages(rewards, group_size, scale_by_std=False) * (group_size / (group_size - 1))
