"""Advantage estimators: (N,) rewards, the G completions of each prompt adjacent -> (N,) advantages.

A group whose rewards are all equal gets zero advantage under every estimator here."""

from __future__ import annotations

import torch

from dgg.algos.registry import Registry

ADVANTAGES = Registry("advantage estimator", "algo.advantage")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages Â of Eq. 1: (r − mean_group) / (std_group + eps).

    ``rewards`` is (N,) with the G completions of a prompt adjacent. ``scale_by_std=False`` gives the
    Dr. GRPO variant (mean-centred only). A group whose rewards are all equal gets zero advantage.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries "
                         f"(got shape {tuple(rewards.shape)})")
    grouped = rewards.float().view(-1, group_size)  # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True, unbiased=True) + eps) if group_size > 1 else centred
    return centred.view(-1)


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
