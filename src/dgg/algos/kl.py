"""Estimators of KL(π_θ ‖ π_ref) from the sampled tokens' log-probabilities (Schulman, "Approximating KL
divergence", 2020): (N, R) log π_θ and log π_ref -> (N, R) per-token estimates."""

from __future__ import annotations

import torch

from dgg.algos.registry import Registry

KL_ESTIMATORS = Registry("KL estimator", "algo.kl_estimator")


@KL_ESTIMATORS.register("k1")
def k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log π_θ − log π_ref: unbiased, high variance, can be negative."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def k2(logprobs, ref_logprobs):
    """½ (log π_θ − log π_ref)²: low variance, biased; its gradient is the true KL's to first order."""
    return 0.5 * (logprobs - ref_logprobs).square()


@KL_ESTIMATORS.register("k3")
def k3(logprobs, ref_logprobs):
    """exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1: unbiased and non-negative (GRPO's KL term)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0
