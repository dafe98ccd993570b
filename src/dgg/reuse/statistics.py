"""How far π_θ has moved from π_old on an update's sampled tokens: the statistics reuse rules read (KL to π_old,
clip fraction, moments of the log-ratio; Theorem 2's mean r²). Pure torch; shapes (N, R), ``mask`` 1.0 on the
T active tokens."""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the active tokens of the whole batch (the 1/T of Eq. 1)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


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
