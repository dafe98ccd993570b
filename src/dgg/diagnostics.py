"""Diagnostics that read the training forward, behind one small protocol, so the update only feeds them.

An observer says per update attempt whether it watches (``begin``), whether it needs the forward's logits and
lm_head inputs (``needs_logits``), whether it can do with the lm_head inputs alone when the forward keeps no
logits (``train.logprob_chunk``: ``works_chunked``), and whether its time stays off the training clock
(``off_clock``); it is fed
each micro-batch's forward (:class:`MicroBatchForward`) and returns its metrics once the update's lm_head energy
is read (``finish``). The two here: the lm_head energy split by the sign of the advantage (dgg.energy_split) and
Theorem 2 checked live (dgg.theory.LiveTheorem2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from dgg.energy_split import EnergySplit
from dgg.theory import LiveTheorem2


@dataclass(frozen=True)
class MicroBatchForward:
    """What one micro-batch's training forward computed, for observers."""

    hidden: torch.Tensor | None  # (N, R, d) lm_head inputs at the completion positions
    logits: torch.Tensor | None  # (N, R, V) raw logits there; None under train.logprob_chunk
    completion_ids: torch.Tensor  # (N, R) sampled tokens
    log_ratio: torch.Tensor  # (N, R) detached log π_θ − log π_old
    advantages: torch.Tensor  # (N,)
    mask: torch.Tensor  # (N, R) active tokens
    total_tokens: float  # T of the whole update attempt
    head: torch.nn.Module | None = None  # the lm_head, which computes the logits from ``hidden`` when they are None


class ForwardObserver(Protocol):
    needs_logits: bool
    works_chunked: bool
    off_clock: bool

    def begin(self, attempt: int) -> bool: ...

    def micro_batch(self, forward: MicroBatchForward) -> None: ...

    def finish(self, energy: float) -> dict[str, float]: ...


class EnergySplitObserver:
    """``energy/neg``, ``energy/pos``, ... every ``every`` attempts (``profile.energy_split_every``), off the clock."""

    needs_logits, works_chunked, off_clock = True, True, True

    def __init__(self, every: int, temperature: float, clip_eps: float, clip_eps_high: float | None):
        self.every, self.temperature, self.clip_eps, self.clip_eps_high = every, temperature, clip_eps, clip_eps_high
        self.split: EnergySplit | None = None

    def begin(self, attempt: int) -> bool:
        self.split = EnergySplit() if attempt % self.every == 0 else None
        return self.split is not None

    def micro_batch(self, forward: MicroBatchForward) -> None:
        self.split.add(forward.hidden, forward.logits, forward.completion_ids, forward.log_ratio, forward.advantages,
                       forward.mask, forward.total_tokens, self.temperature, self.clip_eps, self.clip_eps_high,
                       forward.head)

    def finish(self, energy: float) -> dict[str, float]:
        return self.split.metrics()


class Theorem2Observer(LiveTheorem2):
    """Theorem 2 on every attempt (``profile.theorem2``), on the training clock; nothing for a non-finite energy."""

    needs_logits, works_chunked, off_clock = True, False, False

    def begin(self, attempt: int) -> bool:
        self.reset()
        return True

    def micro_batch(self, forward: MicroBatchForward) -> None:
        self.add(forward.hidden, forward.logits, forward.completion_ids, forward.advantages, forward.mask,
                 forward.log_ratio)

    def finish(self, energy: float) -> dict[str, float]:
        return self.check(energy) if math.isfinite(energy) else {}


def observers_for(config, model, objective) -> list:
    """The diagnostics a run's config asks for. Both assume the paper's surrogate without a KL term; Theorem 2
    bounds the output projection's gradient, so it is off when the gate reads the tied matrix's total."""
    if config.algo.kl_coef != 0 or not objective.is_papers_surrogate:
        return []
    observers: list = []
    if config.profile.energy_split_every:
        observers.append(EnergySplitObserver(config.profile.energy_split_every, config.rollout.temperature,
                                             config.algo.clip_eps, config.algo.clip_eps_high))
    head = model.get_output_embeddings()
    tied_total = config.reuse.tied == "total" and head.weight is model.get_input_embeddings().weight
    if config.profile.theorem2 and not tied_total:
        observers.append(Theorem2Observer(config.rollout.temperature, getattr(head, "bias", None) is not None))
    return observers
