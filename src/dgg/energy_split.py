"""Which tokens carry the lm_head gradient: its energy split by the sign of the advantage (paper §4).

The paper's mechanism for the DWD phenomenon is the gradient of *negative-advantage* tokens whose importance
ratio grows during reuse (Proposition 1, Theorem 2): their rank-1 terms ``w_i (e_{a_i} − π_i) h_iᵀ`` dominate
G_lm. The total energy g_t cannot tell that part apart — clipping can shrink the total while the unclipped
negative part surges — so this module measures the parts directly.

For the trainer's loss ``L = −(1/T) Σ_i m_i min(r_i Â_i, clip(r_i) Â_i)`` the lm_head weight gradient is
``G = Σ_i w_i (e_{a_i} − softmax(z_i/τ)) h_iᵀ / τ`` with ``w_i = −λ_i r_i Â_i m_i / T`` (λ_i = 0 where the clip
removes the token's gradient). Splitting the sum by the sign of Â_i gives ``G = G_neg + G_pos``; each part is one
(V, d) matrix, accumulated over micro-batches, at the cost of about one lm_head matmul per part (in bf16 when
training is). The trainer keeps this diagnostic's time off its training clock.
"""

from __future__ import annotations

import torch

PARTS = ("neg", "pos")


@torch.no_grad()
def token_gradient_weights(log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                           total_tokens: float, clip_eps: float, clip_eps_high: float | None = None) -> torch.Tensor:
    """(N, R) w_i = −λ_i r_i Â_i m_i / T of the clipped surrogate (λ_i = 0 on tokens whose gradient is clipped)."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(log_ratio.float())
    adv = advantages.float().unsqueeze(1)
    clipped_away = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * adv < ratio * adv
    return -(~clipped_away).float() * ratio * adv * mask.float() / total_tokens


@torch.no_grad()
def lm_head_gradient_part(hidden: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                          weights: torch.Tensor, temperature: float, chunk_tokens: int = 256,
                          matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(V, d) Σ_i w_i (e_{a_i} − softmax(z_i/τ)) h_iᵀ / τ over the tokens with w_i ≠ 0.

    hidden (N, R, d), logits (N, R, V) raw, targets (N, R), weights (N, R). The softmax and the accumulation
    are float32; ``matmul_dtype=torch.bfloat16`` runs the one large product (π_iᵀ times w_i h_i) in bfloat16,
    as the bf16 training forward and backward do."""
    keep = weights != 0
    vocab, width = logits.shape[-1], hidden.shape[-1]
    part = torch.zeros(vocab, width, dtype=torch.float32, device=hidden.device)
    if not bool(keep.any()):
        return part
    scaled = (weights[keep] / temperature).unsqueeze(1) * hidden[keep].float()  # (M, d): w_i h_i / τ
    part.index_add_(0, targets[keep].long(), scaled)  # the e_{a_i} h_iᵀ terms
    kept_logits = logits[keep]
    for start in range(0, scaled.shape[0], chunk_tokens):
        probs = torch.softmax(kept_logits[start:start + chunk_tokens].float() / temperature, dim=-1)  # (m, V)
        chunk = scaled[start:start + chunk_tokens]
        part.sub_((probs.T.to(matmul_dtype) @ chunk.to(matmul_dtype)).float())  # the π_i h_iᵀ terms
    return part


class EnergySplit:
    """Accumulates G_neg and G_pos over the micro-batches of one update attempt."""

    def __init__(self, precision: str = "fp32"):
        self.parts: dict[str, torch.Tensor | None] = dict.fromkeys(PARTS)
        self.matmul_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def add(self, hidden, logits, targets, log_ratio, advantages, mask, total_tokens: float, temperature: float,
            clip_eps: float, clip_eps_high: float | None = None) -> None:
        weights = token_gradient_weights(log_ratio, advantages, mask, total_tokens, clip_eps, clip_eps_high)
        sign = advantages.float().unsqueeze(1).expand_as(weights)
        for name, selected in (("neg", sign < 0), ("pos", sign > 0)):
            part = lm_head_gradient_part(hidden, logits, targets, torch.where(selected, weights, 0.0), temperature,
                                         matmul_dtype=self.matmul_dtype)
            self.parts[name] = part if self.parts[name] is None else self.parts[name].add_(part)

    def metrics(self) -> dict[str, float]:
        """``energy/neg`` = ‖G_neg‖², ``energy/pos`` = ‖G_pos‖², ``energy/total`` = ‖G_neg + G_pos‖² (the
        probe's g_t of the output projection), ``energy/neg_share`` = ‖G_neg‖² / (‖G_neg‖² + ‖G_pos‖²)."""
        if any(p is None for p in self.parts.values()):
            return {}
        neg, pos = self.parts["neg"], self.parts["pos"]
        e_neg, e_pos = float(neg.double().square().sum()), float(pos.double().square().sum())
        total = float((neg + pos).double().square().sum())
        share = e_neg / (e_neg + e_pos) if e_neg + e_pos > 0 else None
        return {"energy/neg": e_neg, "energy/pos": e_pos, "energy/total": total, "energy/neg_share": share}
