"""The objective, one choice per registry: advantage estimator, policy loss, loss aggregation, KL estimator,
token-credit modifier and token mask, composed by :class:`Objective`. The trainer calls only this; the gate never sees which
objective produced the gradient it reads (the paper's claim that DGG is orthogonal to the objective)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dgg.algos.advantages import ADVANTAGES
from dgg.algos.aggregation import AGGREGATIONS, micro_loss
from dgg.algos.kl import KL_ESTIMATORS
from dgg.algos.policy_losses import POLICY_LOSSES, ClipSettings
from dgg.algos.token_credit import NEEDS_ENTROPY, TOKEN_CREDIT, CreditSettings
from dgg.algos.token_masks import TOKEN_MASKS

KL_PLACES = ("loss", "reward")

__all__ = ["ADVANTAGES", "AGGREGATIONS", "KL_ESTIMATORS", "KL_PLACES", "POLICY_LOSSES", "TOKEN_CREDIT",
           "TOKEN_MASKS", "ClipSettings", "CreditSettings", "Objective"]


@dataclass(frozen=True)
class Objective:
    advantage: str = "grpo"
    loss: str = "ppo_clip"
    aggregation: str = "token-mean"
    kl_estimator: str = "k3"
    kl_in: str = "loss"
    token_credit: str = "none"
    token_mask: str = "none"
    m2_threshold: float = 0.04
    kl_coef: float = 0.0
    clip: ClipSettings = field(default_factory=ClipSettings)
    credit: CreditSettings = field(default_factory=CreditSettings)

    def __post_init__(self):
        for registry, name in ((ADVANTAGES, self.advantage), (POLICY_LOSSES, self.loss),
                               (AGGREGATIONS, self.aggregation), (KL_ESTIMATORS, self.kl_estimator),
                               (TOKEN_CREDIT, self.token_credit), (TOKEN_MASKS, self.token_mask)):
            registry[name]  # an unknown name fails here, listing the valid ones
        if self.kl_in not in KL_PLACES:
            from dgg.errors import UserError

            raise UserError(f"algo.kl_in must be one of {', '.join(KL_PLACES)} (got {self.kl_in!r})")

    @property
    def needs_entropy(self) -> bool:
        return self.token_credit in NEEDS_ENTROPY

    @property
    def is_papers_surrogate(self) -> bool:
        """The exact loss of the paper's Eq. 1, which Theorem 2's bound and the energy split assume."""
        return self.loss == "ppo_clip" and self.aggregation == "token-mean" and self.token_credit == "none" \
            and self.token_mask == "none"

    def advantages(self, rewards: torch.Tensor, group_size: int, kl_penalty: torch.Tensor | None = None):
        """(N,) advantages; with ``kl_in="reward"`` the (N,) KL penalty is taken off the rewards first."""
        if kl_penalty is not None and self.kl_in == "reward" and self.kl_coef > 0:
            rewards = rewards - self.kl_coef * kl_penalty
        return ADVANTAGES[self.advantage](rewards, group_size)

    def sequence_kl(self, logprobs, ref_logprobs, mask) -> torch.Tensor:
        """(N,) Σ over each completion's tokens of the KL estimate: the penalty ``kl_in="reward"`` subtracts."""
        return (KL_ESTIMATORS[self.kl_estimator](logprobs, ref_logprobs) * mask).sum(1)

    def token_weights(self, mask: torch.Tensor, group_size: int, max_tokens: int):
        """(w, z) of the whole batch, computed once per update attempt (see aggregation.py)."""
        return AGGREGATIONS[self.aggregation](mask.to(torch.float32), group_size, max_tokens)

    def loss_of(self, logprobs, old_logprobs, advantages, mask, weights, norms, ref_logprobs=None, entropy=None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A micro-batch's loss: (N,) advantages -> token credit -> policy loss -> aggregation, plus the KL term
        when ``kl_in="loss"``. Returns the loss and detached extras (``ref_kl``, ``silenced_tokens``)."""
        mask = mask.to(logprobs.dtype)
        token_advantages = advantages.to(logprobs.dtype).unsqueeze(1).expand_as(logprobs)
        credited, credit_mask = TOKEN_CREDIT[self.token_credit](token_advantages, logprobs.detach(), entropy, mask,
                                                                self.credit)
        if self.token_mask != "none":
            kept = TOKEN_MASKS[self.token_mask](logprobs.detach() - old_logprobs, credit_mask, self.m2_threshold)
            masked_tokens = (credit_mask - kept).sum().detach()
            credit_mask = kept
        per_token = POLICY_LOSSES[self.loss](logprobs, old_logprobs, credited, credit_mask, self.clip)
        weights = weights.to(logprobs.dtype) * credit_mask if credit_mask is not mask else weights.to(logprobs.dtype)
        loss = micro_loss(per_token, weights, norms)
        extras: dict[str, torch.Tensor] = {}
        if credit_mask is not mask:
            extras["silenced_tokens"] = (mask - credit_mask).sum().detach()
        if self.token_mask != "none":
            extras["masked_tokens"] = masked_tokens
        if ref_logprobs is not None and self.kl_coef > 0 and self.kl_in == "loss":
            kl = micro_loss(KL_ESTIMATORS[self.kl_estimator](logprobs, ref_logprobs), weights, norms)
            loss = loss + self.kl_coef * kl
            extras["ref_kl"] = kl.detach()
        return loss, extras
