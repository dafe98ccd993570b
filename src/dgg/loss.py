"""GRPO's advantage and policy loss as pure functions (paper §3, Eq. 1–2, Theorem 2).

Shapes: N completions, R completion positions. ``mask`` is 1.0 on the T active (sampled) tokens.
"""

from __future__ import annotations

import torch


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


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the active tokens of the whole batch (the 1/T of Eq. 1)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def clipped_surrogate_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                           mask: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The negated clipped surrogate of Eq. 1, averaged over the T active tokens of the batch.

    Args:
        logprobs: (N, R) log π_θ of the sampled tokens (with grad).
        old_logprobs: (N, R) log π_old of the same tokens, from the behaviour policy.
        advantages: (N,) group-normalised advantages, broadcast over each completion's tokens.
        mask: (N, R) 1.0 on active tokens.
        clip_eps, clip_eps_high: the ratio is clipped to [1 − clip_eps, 1 + clip_eps_high]
            (clip_eps_high defaults to clip_eps; a larger one is DAPO's clip-higher).

    Returns the loss to minimise and detached per-batch statistics: ``clip_ratio`` (fraction of active tokens
    whose gradient the clip removes), ``kl`` (k3 estimate of KL(π_old‖π_θ) on the sampled tokens),
    ``chi2`` (χ̂² = mean(r²) − 1 of Theorem 2), ``r2_mean``, ``ratio_max``, and the mean and second moment of
    log r (``log_ratio_mean``: minus Spinning Up's KL estimate; ``log_ratio_sq_mean``: M2PO's statistic).
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)  # r_i(θ), Eq. 1
    adv = advantages.to(logprobs.dtype).unsqueeze(1)  # (N, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * adv
    objective = torch.minimum(unclipped, clipped)
    loss = -masked_mean(objective, mask)

    stats = ratio_statistics(logprobs.detach(), old_logprobs, advantages, mask, clip_eps, high)
    return loss, stats


@torch.no_grad()
def ratio_statistics(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None
                     ) -> dict[str, torch.Tensor]:
    """How far π_θ has moved from π_old on the sampled tokens: the signals reuse rules read.

    Means are over the active tokens of ``mask``. ``kl``: SB3's approx_kl, mean((r − 1) − log r) (k3);
    ``log_ratio_mean``: mean(log r) (Spinning Up's KL estimate is its negative); ``log_ratio_sq_mean``:
    mean((log r)²) (M2PO's statistic); ``clip_ratio``: share of tokens whose gradient the clip of Eq. 1
    removes; ``chi2`` = mean(r²) − 1 and ``r2_mean`` (Theorem 2); ``ratio_max``. ``advantages`` is (N,) or
    (N, R)."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logprobs.dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    clipped_away = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * adv < ratio * adv
    active = mask > 0
    return {
        "clip_ratio": masked_mean(clipped_away.to(mask.dtype), mask),
        "kl": masked_mean(ratio - 1.0 - log_ratio, mask),
        "chi2": masked_mean(ratio.square(), mask) - 1.0,
        "r2_mean": masked_mean(ratio.square(), mask),
        "ratio_max": ratio[active].max() if active.any() else ratio.new_tensor(1.0),
        "log_ratio_mean": masked_mean(log_ratio, mask),
        "log_ratio_sq_mean": masked_mean(log_ratio.square(), mask),
    }


def reference_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π_θ‖π_ref) on the sampled tokens, averaged over active tokens (GRPO's KL term)."""
    log_ratio = ref_logprobs - logprobs
    return masked_mean(torch.exp(log_ratio) - log_ratio - 1.0, mask.to(logprobs.dtype))
