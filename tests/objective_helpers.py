"""The paper's loss (Eq. 1) through dgg.algos, with the ratio statistics, for tests that need a loss and not a
trainer: one copy of the math, the one the trainer uses."""

from __future__ import annotations

from dgg.algos import ClipSettings, Objective
from dgg.reuse.statistics import ratio_statistics


def papers_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float = 0.2, clip_eps_high: float | None = None):
    """(negated clipped surrogate averaged over the T active tokens, ratio statistics), as Eq. 1."""
    objective = Objective(clip=ClipSettings(clip_eps, clip_eps_high))
    weights, norms = objective.token_weights(mask, 1, mask.shape[1])
    loss, _ = objective.loss_of(logprobs, old_logprobs, advantages, mask, weights, norms)
    return loss, ratio_statistics(logprobs.detach(), old_logprobs, advantages, mask, clip_eps, clip_eps_high)
