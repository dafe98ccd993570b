"""Theorem 2 live (paper §4.2.2, Lemma 2, Appendix B): ‖G_lm‖²_F ≤ c_max · mean(r²), checked on the training
forward's own logits and lm_head inputs."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# ----------------------------------------------------------------------------------------------------------


# Theorem 2 live (paper §4.2.2, Lemma 2, Appendix B): ‖G_lm‖²_F ≤ c_max · mean(r²)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LMHeadInputCapture:
    """What :func:`capture_lm_head_input` recorded."""

    hidden: torch.Tensor | None = None
    """Input of the lm_head in the latest forward pass, detached, shape ``(N, L, d_model)`` (``L`` is the
    number of positions whose logits the model computed, all of them unless ``logits_to_keep`` is set)."""
    calls: int = 0
    """Number of forward passes seen."""


@contextmanager
def capture_lm_head_input(model: nn.Module) -> Iterator[LMHeadInputCapture]:
    """Record the lm_head input ``h_L`` of every forward pass inside the block (a forward pre-hook on
    ``model.get_output_embeddings()``); each pass overwrites ``capture.hidden``.

    Usage::

        with capture_lm_head_input(model) as capture:
            logprobs = completion_logprobs(model, ids, attention, prompt_length, temperature)
        hidden = capture.hidden[:, prompt_length - 1:-1]  # (N, R, d), the rows that predict completions

    The stored tensor is detached (no extra autograd memory) and is the very tensor the head multiplies,
    so keeping it costs nothing beyond the reference."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("model has no output embeddings (get_output_embeddings() returned None)")
    capture = LMHeadInputCapture()

    def record(module, inputs):
        capture.hidden = inputs[0].detach()
        capture.calls += 1

    handle = head.register_forward_pre_hook(record)
    try:
        yield capture
    finally:
        handle.remove()


def softmax_error_sq_norm(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                          chunk_rows: int = 8) -> torch.Tensor:
    """``‖e_a − π‖²`` with ``π = softmax(logits/temperature)``, for every position, without one-hot vectors.

    ``‖e_a − π‖² = 1 − 2π_a + Σ_j π_j² = (Σ_{j≠a} π_j)² + Σ_{j≠a} π_j²``; the last form is evaluated (it
    has no cancellation when ``π_a → 1``). ``logits`` is ``(..., V)``, ``targets`` the matching ``(...)`` ids;
    the first dimension is processed ``chunk_rows`` at a time, so at most two float32 tensors of
    ``chunk_rows × … × V`` exist at once. Returns float32 of shape ``targets.shape``."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must be logits shape {tuple(logits.shape)} "
                         "without its last (vocabulary) dimension")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dim() == 1:
        return softmax_error_sq_norm(logits.unsqueeze(0), targets.unsqueeze(0), temperature, chunk_rows)[0]
    parts = []
    for start in range(0, logits.shape[0], max(1, chunk_rows)):
        with torch.no_grad():
            probs = torch.softmax(logits[start:start + chunk_rows].float() / temperature, dim=-1)
            index = targets[start:start + chunk_rows].long().unsqueeze(-1)
            others = probs.scatter_(-1, index, 0.0)  # π with π_a zeroed, in place
            miss = others.sum(-1)  # 1 − π_a, summed rather than subtracted: exact even when π_a → 1
            parts.append(miss.square() + others.square_().sum(-1))
    return torch.cat(parts)


def theorem2_terms(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    log_ratio: torch.Tensor,
    temperature: float = 1.0,
    *,
    lm_head_bias: bool = False,
    chunk_rows: int = 8,
) -> dict[str, torch.Tensor]:
    """The right-hand side of Lemma 2 / Theorem 2 (Eq. 6–7) for one batch of the trainer's loss.

    Args:
        hidden: (N, R, d) lm_head input ``h_{L,i}`` at the positions that predict the completion tokens.
        logits: (N, R, V) raw lm_head output at the same positions (before dividing by the temperature).
        targets: (N, R) sampled tokens ``a_i``.
        advantages: (N,) ``Â``, broadcast over each completion's tokens.
        mask: (N, R) 1.0 on the T active tokens, 0.0 on padding.
        log_ratio: (N, R) ``log π_θ − log π_old`` of the sampled tokens (any value on padding).
        temperature: τ of ``completion_logprobs``, i.e. ``log π_θ = log_softmax(logits/τ)``.
        lm_head_bias: the head has a bias and the energy includes its gradient (adds 1 to ``‖h_i‖²``).
        chunk_rows: completions per softmax chunk (memory: two float32 ``chunk_rows × R × V`` tensors).

    Returns 0-dim float32 tensors:
        ``c_max = max_i Â_i²·‖e_{a_i} − π_θ(·|h_i)‖²·‖h_i‖²/τ²`` over active tokens (0 if none),
        ``r2_mean = (1/T) Σ_i r_i²`` (the ``r2_mean`` of ``clipped_surrogate_loss``; ``χ̂² = r2_mean − 1``),
        ``bound = c_max · r2_mean``, and ``tokens = T``.

    **The 1/τ² factor.** The trainer's log-probability is ``log π_θ(a) = z_a/τ − logsumexp(z/τ)`` with
    ``z = W h (+ b)``, so ``∂ log π_θ(a)/∂z = (e_a − π_θ)/τ`` with ``π_θ = softmax(z/τ)`` (the sampling
    policy that ``r_i`` compares), and the per-token lm_head gradient of Proposition 1 becomes
    ``r_i Â_i (e_{a_i} − π_θ) h_iᵀ/τ``; its squared norm is ``r_i²·Â_i²‖e_a − π_θ‖²‖h_i‖²/τ²``.

    **Clipping (why the bound holds for the clipped loss).** The loss is ``−(1/T) Σ_i m_i min(r_i Â_i,
    clip(r_i) Â_i)``. For each token, ``∂/∂ log π_θ(a_i)`` of ``min(…)`` is ``λ_i r_i Â_i`` with
    ``λ_i ∈ {0, 1}`` (0 where the clipped branch is active: Â>0, r>1+ε_high or Â<0, r<1−ε; ties at the
    clip boundary split the gradient, ``λ_i ∈ [0, 1]``). With ``U`` the tokens with ``λ_i > 0`` and
    ``c_i = Â_i²‖e_{a_i} − π_θ‖²‖h_i‖²/τ² ≤ c_max``:

        ‖G_lm‖_F = (1/T)‖Σ_{i∈U} λ_i r_i Â_i (e_{a_i} − π_θ) h_iᵀ/τ‖_F
                 ≤ (1/T) Σ_{i∈U} |r_i| √c_i                        (triangle inequality, λ_i ≤ 1, rank 1)
                 ≤ (1/T) √(Σ_{i∈U} c_i) · √(Σ_{i∈U} r_i²)            (Cauchy–Schwarz)
                 ≤ (1/T) √(T·c_max) · √(Σ_{i=1..T} r_i²),            (|U| ≤ T, U ⊆ all tokens)

    so ``‖G_lm‖²_F ≤ c_max · (1/T) Σ_{all i} r_i² = bound``: the clipped tokens still count in ``r2_mean``.

    **Conditions.** ``G_lm`` is the lm_head *weight* gradient of ``clipped_surrogate_loss`` alone, with its
    1/T average over the whole batch: the reference-KL term (``kl_coef > 0``) or any other loss term adds
    gradient the bound does not cover; a tied head must be read with the output-only probe (the embedding
    use of the shared matrix adds gradient too); a bias does not change the weight gradient, but if the
    measured energy also includes the bias gradient pass ``lm_head_bias=True`` (``[h; 1]`` has norm²
    ``‖h‖² + 1``). Micro-batches: combine the per-micro-batch terms with :func:`merge_theorem2_terms`.
    """
    if hidden.dim() != 3 or logits.dim() != 3:
        raise ValueError(f"hidden must be (N, R, d) and logits (N, R, V); got {tuple(hidden.shape)} and "
                         f"{tuple(logits.shape)}")
    rows = hidden.shape[:2]
    for name, tensor in (("logits", logits[..., 0]), ("targets", targets), ("mask", mask),
                         ("log_ratio", log_ratio)):
        if tensor.shape != rows:
            raise ValueError(f"{name} must have shape (N, R) = {tuple(rows)} in its first two dimensions, "
                             f"got {tuple(tensor.shape)}")
    if advantages.shape != rows[:1]:
        raise ValueError(f"advantages must have shape (N,) = ({rows[0]},), got {tuple(advantages.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.no_grad():
        active = mask > 0
        error_sq = softmax_error_sq_norm(logits, targets, temperature, chunk_rows)  # (N, R)
        hidden_sq = hidden.float().square().sum(-1) + (1.0 if lm_head_bias else 0.0)  # (N, R)
        per_token = advantages.float().square().unsqueeze(1) * error_sq * hidden_sq / temperature**2
        zero = per_token.new_zeros(())
        c_max = torch.where(active, per_token, zero).max() if active.any() else zero
        tokens = active.float().sum()
        r2 = torch.where(active, torch.exp(2.0 * log_ratio.float()), zero)
        r2_mean = r2.sum() / tokens.clamp(min=1.0)  # the 1/T of Eq. 1, as masked_mean
    return {"c_max": c_max, "r2_mean": r2_mean, "bound": c_max * r2_mean, "tokens": tokens}


def merge_theorem2_terms(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Terms of a batch back-propagated in micro-batches, each weighted by its share ``T_k/T`` of the
    tokens (as the trainer does): ``c_max`` is the maximum, ``r2_mean`` the token-weighted mean."""
    if not parts:
        raise ValueError("parts is empty: give the theorem2_terms of at least one micro-batch")
    tokens = torch.stack([p["tokens"] for p in parts]).sum()
    c_max = torch.stack([p["c_max"] for p in parts]).max()
    r2_mean = torch.stack([p["r2_mean"] * p["tokens"] for p in parts]).sum() / tokens.clamp(min=1.0)
    return {"c_max": c_max, "r2_mean": r2_mean, "bound": c_max * r2_mean, "tokens": tokens}


def theorem2_metrics(terms: dict[str, torch.Tensor], energy: float | torch.Tensor,
                     rel_tol: float = 1e-5) -> dict[str, float]:
    """Metrics for one update from the terms and the measured ``energy = ‖G_lm‖²_F``:

    ``theory/c_max``, ``theory/r2_mean``, ``theory/bound_slack = c_max·r2_mean − energy`` (≥ 0 by Theorem 2),
    ``theory/bound_violations`` (1.0 if ``energy > bound·(1 + rel_tol)``, else 0.0; sum it for a running
    count) and ``theory/energy_over_bound`` (tightness, in [0, 1] when the theorem holds; 0 when bound is 0).
    """
    energy = float(energy)
    bound = float(terms["bound"])
    return {
        "theory/c_max": float(terms["c_max"]),
        "theory/r2_mean": float(terms["r2_mean"]),
        "theory/bound_slack": bound - energy,
        "theory/bound_violations": float(energy > bound * (1.0 + rel_tol)),
        "theory/energy_over_bound": energy / bound if bound > 0 else 0.0,
    }


class LiveTheorem2:
    """Theorem 2 checked on every update from its own training forward: the terms of each micro-batch are
    gathered as the forward runs, and the bound is compared with the probe's energy once the update is read.
    A violation is counted, never hidden (``theory/bound_violations`` is this update's count: 0 or 1)."""

    def __init__(self, temperature: float, lm_head_bias: bool):
        self.temperature, self.lm_head_bias = temperature, lm_head_bias
        self.reset()

    def reset(self) -> None:
        """A new update attempt."""
        self._parts: list[dict[str, torch.Tensor]] = []
        self._seconds = 0.0

    @torch.no_grad()
    def add(self, hidden: torch.Tensor, logits: torch.Tensor, completion_ids: torch.Tensor,
            advantages: torch.Tensor, mask: torch.Tensor, log_ratio: torch.Tensor) -> None:
        """One micro-batch's terms (see :func:`theorem2_terms`)."""
        started = time.perf_counter()
        self._parts.append(theorem2_terms(hidden.float(), logits, completion_ids, advantages, mask, log_ratio,
                                          self.temperature, lm_head_bias=self.lm_head_bias))
        self._seconds += time.perf_counter() - started

    def check(self, energy: float) -> dict[str, float]:
        """The update's Theorem 2 metrics (empty when no micro-batch was added) and ``perf/theorem2_seconds``."""
        parts, self._parts = self._parts, []
        if not parts:
            return {}
        started = time.perf_counter()
        values = theorem2_metrics(merge_theorem2_terms(parts), energy)
        values["perf/theorem2_seconds"] = self._seconds + time.perf_counter() - started
        return values
