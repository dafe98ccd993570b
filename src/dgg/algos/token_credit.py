"""Token-credit modifiers: which tokens get how much of their completion's advantage.

Each maps (N, R) advantages, the detached (N, R) log π_θ of the sampled tokens, their (N, R) entropies (None
when the modifier does not need them) and the mask to new (advantages, mask). Both modifiers here follow the
papers' public descriptions only; where a detail was not public, the choice made is said in the docstring."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgg.algos.registry import Registry

TOKEN_CREDIT = Registry("token-credit modifier", "algo.token_credit")


@dataclass(frozen=True)
class CreditSettings:
    stapo_max_prob: float = 0.01
    """STAPO: a token is spurious when the policy gave it probability below this..."""
    stapo_max_entropy: float = 0.5
    """...while the policy was confident at that position (entropy in nats below this)."""
    eapo_alpha: float = 0.5
    """EAPO: how strongly a token's entropy scales its share of the advantage (0: plain advantages)."""


NEEDS_ENTROPY = {"stapo", "eapo"}


@TOKEN_CREDIT.register("none")
def none(advantages, logprobs, entropy, mask, settings: CreditSettings):
    """Every token carries its completion's advantage (GRPO)."""
    return advantages, mask


@TOKEN_CREDIT.register("stapo")
def stapo(advantages, logprobs, entropy, mask, settings: CreditSettings):
    """STAPO-style silencing of rare spurious tokens: a sampled token that the policy found very unlikely
    (p < stapo_max_prob) at a position where it was otherwise confident (entropy < stapo_max_entropy) is taken
    as a sampling accident; it is removed from the loss when its completion's advantage is positive, so that
    the accident is not reinforced. Approximation: the thresholds and the positive-advantage-only rule are our
    reading of the public description, not the authors' code. The aggregation's normaliser still counts the
    silenced tokens' positions only if the mask it was given did (weights are computed before this)."""
    spurious = (logprobs.exp() < settings.stapo_max_prob) & (entropy < settings.stapo_max_entropy) & (advantages > 0)
    return advantages, mask * (~spurious).to(mask.dtype)


@TOKEN_CREDIT.register("eapo")
def eapo(advantages, logprobs, entropy, mask, settings: CreditSettings):
    """EAPO-style entropy-aware credit: a token's advantage is scaled by 1 + α·(H_t / H̄ − 1), clamped to
    [0, 2], where H̄ is the mean entropy over the batch's active tokens, so high-entropy "forking" tokens get
    more of the credit and near-deterministic ones less. Approximation: the form of the scaling is ours; the
    public description gives the idea (credit follows entropy), not this formula."""
    active = mask > 0
    mean_entropy = entropy[active].mean().clamp(min=1e-6) if active.any() else entropy.new_tensor(1.0)
    scale = torch.clamp(1.0 + settings.eapo_alpha * (entropy / mean_entropy - 1.0), 0.0, 2.0)
    return advantages * scale.detach(), mask
