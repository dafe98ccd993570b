"""How per-token losses become one number, so that micro-batches add up to exactly the full batch.

An aggregation maps the full batch's (N, R) mask to per-token weights ``w`` and per-row normalisers ``z``. A
micro-batch of rows M contributes loss_M = Σ_M w·ℓ / Σ_M z with share Σ_M z / Σ z; the shares sum to 1 and
Σ_M share·loss_M = Σ w·ℓ / Σ z, whatever the split (weights are computed once, from the whole batch)."""

from __future__ import annotations

import torch

from dgg.algos.registry import Registry

AGGREGATIONS = Registry("loss aggregation", "algo.aggregation")


@AGGREGATIONS.register("token-mean")
def token_mean(mask: torch.Tensor, group_size: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over all active tokens of the batch (the paper's 1/T of Eq. 1; DAPO's token-level loss)."""
    return mask, mask.sum(1)


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(mask, group_size, max_tokens):
    """Mean over each completion's tokens, then over completions (the original GRPO; GSPO's sequence mean)."""
    lengths = mask.sum(1, keepdim=True).clamp(min=1)
    return mask / lengths, (mask.sum(1) > 0).to(mask.dtype)


@AGGREGATIONS.register("group-mean-token-mean")
def group_mean_token_mean(mask, group_size, max_tokens):
    """Mean over the tokens of each prompt's group, then over groups: every prompt weighs the same, and inside a
    group every token does."""
    per_row = mask.sum(1)
    group_tokens = per_row.view(-1, group_size).sum(1, keepdim=True).clamp(min=1)  # (P, 1)
    share = (per_row.view(-1, group_size) / group_tokens).view(-1)  # each group's rows sum to 1
    return mask / group_tokens.repeat_interleave(group_size, dim=0), share


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(mask, group_size, max_tokens):
    """Dr. GRPO's: the sum over tokens divided by a constant (the longest allowed completion), then the mean over
    completions, so a long completion's tokens weigh no less than a short one's."""
    return mask, torch.full_like(mask[:, 0], float(max_tokens))


def micro_loss(per_token: torch.Tensor, weights: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """A micro-batch's aggregated loss: Σ w·ℓ / Σ z (0 when the micro-batch holds no active token)."""
    return (per_token * weights).sum() / norms.sum().clamp(min=1e-12)
