"""Token masks on the importance ratio: drop the most off-policy tokens from the loss instead of stopping reuse.

Each maps the detached (N, R) log ratio log π_θ − log π_old and the (N, R) mask of the tokens the loss would use
to the mask it should use; the aggregation's normaliser is left as it was (the masked tokens still count in it),
as M2PO's objective divides by every sampled token."""

from __future__ import annotations

import torch

from dgg.algos.registry import Registry

TOKEN_MASKS = Registry("token mask", "algo.token_mask")


@TOKEN_MASKS.register("none")
def none(log_ratio: torch.Tensor, mask: torch.Tensor, m2_threshold: float) -> torch.Tensor:
    return mask


@TOKEN_MASKS.register("m2po")
def m2po(log_ratio: torch.Tensor, mask: torch.Tensor, m2_threshold: float) -> torch.Tensor:
    """M2PO's second-moment mask (Zheng et al. 2025), as AReaL applies it with ``actor.m2_threshold``: among the
    active tokens, drop those with the largest (log r)², largest first, until the mean (log r)² of the tokens
    kept is below ``m2_threshold``; if no such point exists, keep only the smallest. Like AReaL, it is computed
    on each micro-batch the loss sees (here: the whole mini-batch unless train.micro_batch_size splits it)."""
    active = mask.reshape(-1) > 0
    second_moment = log_ratio.detach().float().pow(2).reshape(-1)[active]
    count = second_moment.numel()
    if count == 0:
        return mask
    ordered, order = torch.sort(second_moment, descending=True)
    kept = torch.arange(count, 0, -1, dtype=ordered.dtype, device=ordered.device)
    mean_of_rest = ordered.flip(0).cumsum(0).flip(0) / kept  # mean of ordered[i:], for each i
    below = torch.nonzero(mean_of_rest < m2_threshold)
    dropped = int(below[0]) if below.numel() else count - 1
    keep_sorted = torch.ones(count, dtype=torch.bool, device=mask.device)
    keep_sorted[:dropped] = False
    keep = torch.zeros_like(active)
    keep[active] = keep_sorted[torch.argsort(order)]
    return mask * keep.view_as(mask).to(mask.dtype)
