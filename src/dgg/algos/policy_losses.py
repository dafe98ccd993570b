"""Policy losses, per token: (N, R) log-probabilities of π_θ (with grad) and π_old, (N, R) advantages and the
(N, R) mask of active tokens -> the (N, R) loss to minimise before aggregation (``aggregation.py``).

Each is the negated objective of its paper; where the objective lives on sequences (GSPO) the sequence's value
is placed on each of its tokens, so that ``seq-mean-token-mean`` aggregation gives the paper's sequence mean."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgg.algos.registry import Registry

POLICY_LOSSES = Registry("policy loss", "algo.loss")


@dataclass(frozen=True)
class ClipSettings:
    clip_eps: float = 0.2
    """ε_c: the token ratio is clipped to [1 − clip_eps, 1 + clip_eps_high] (ppo_clip, cispo)."""
    clip_eps_high: float | None = None
    """Upper clip (DAPO's clip-higher); None uses clip_eps."""
    seq_clip_eps: float = 3e-4
    """GSPO: the sequence ratio is clipped to [1 − seq_clip_eps, 1 + seq_clip_eps_high] (GSPO's 3e-4 / 4e-4)."""
    seq_clip_eps_high: float = 4e-4

    @property
    def high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(logprobs, old_logprobs, advantages, mask, settings: ClipSettings) -> torch.Tensor:
    """The clipped surrogate of PPO / GRPO (the paper's Eq. 1), with DAPO's clip-higher when clip_eps_high is set:
    −min(r·A, clip(r, 1 − ε, 1 + ε_high)·A), r = π_θ / π_old."""
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - settings.clip_eps, 1.0 + settings.high)
    return -torch.minimum(ratio * advantages, clipped * advantages)


@POLICY_LOSSES.register("gspo")
def gspo(logprobs, old_logprobs, advantages, mask, settings: ClipSettings) -> torch.Tensor:
    """GSPO (Zheng et al. 2025): the ratio of whole sequences, s_i = exp(mean over the sequence's tokens of
    log r), clipped to [1 − 3e-4, 1 + 4e-4] by default; −min(s·A, clip(s)·A) on every token of the sequence.
    The gradient of s_i is s_i times the mean of the tokens' ∇log π (the paper's GSPO, not GSPO-token)."""
    mask = mask.to(logprobs.dtype)
    mean_log_ratio = ((logprobs - old_logprobs) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    ratio = torch.exp(mean_log_ratio)  # (N, 1)
    clipped = torch.clamp(ratio, 1.0 - settings.seq_clip_eps, 1.0 + settings.seq_clip_eps_high)
    return -torch.minimum(ratio * advantages, clipped * advantages)


@POLICY_LOSSES.register("cispo")
def cispo(logprobs, old_logprobs, advantages, mask, settings: ClipSettings) -> torch.Tensor:
    """CISPO (MiniMax-M1, 2025): clip the importance weight, not the update: −sg(clip(r, 1 − ε, 1 + ε_high))·A·log π.
    Every token keeps a gradient; a token far off-policy only has it scaled down."""
    weight = torch.clamp(torch.exp(logprobs - old_logprobs), 1.0 - settings.clip_eps, 1.0 + settings.high).detach()
    return -weight * advantages * logprobs
