"""Which tokens carry the lm_head gradient: its energy split by the sign of the advantage (paper §4).

The paper's mechanism for the DWD phenomenon is the gradient of *negative-advantage* tokens whose importance
ratio grows during reuse (Proposition 1, Theorem 2): their rank-1 terms ``w_i (e_{a_i} − π_i) h_iᵀ`` dominate
G_lm. The total energy g_t cannot tell that part apart — clipping can shrink the total while the unclipped
negative part surges — so this module measures the parts directly.

For the trainer's loss ``L = −(1/T) Σ_i m_i min(r_i Â_i, clip(r_i) Â_i)`` the lm_head weight gradient is
``G = Σ_i w_i (e_{a_i} − softmax(z_i/τ)) h_iᵀ / τ`` with ``w_i = −λ_i r_i Â_i m_i / T`` (λ_i = 0 where the clip
removes the token's gradient). Splitting the sum by the sign of Â_i gives ``G = G_neg + G_pos``; each part is one
(V, d) matrix, accumulated over micro-batches; one softmax per token and one matrix product serve both parts
(about one lm_head matmul in all). Under ``train.logprob_chunk`` the forward keeps no logits: the split then runs
the lm_head on the kept tokens' h_i itself, a chunk at a time (one more lm_head matmul). The trainer keeps this
diagnostic's time off its training clock.
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
def lm_head_gradient_parts(hidden: torch.Tensor, logits: torch.Tensor | None, targets: torch.Tensor,
                           weights: torch.Tensor, groups: torch.Tensor, count: int, temperature: float,
                           chunk_tokens: int = 256, head: torch.nn.Module | None = None) -> torch.Tensor:
    """(count, V, d): for each group g, Σ_{i: groups_i = g} w_i (e_{a_i} − softmax(z_i/τ)) h_iᵀ / τ.

    hidden (N, R, d), logits (N, R, V) raw, targets (N, R), weights (N, R), groups (N, R) in [0, count) (tokens
    with w_i = 0 are skipped). Each token's softmax is computed once and one matrix product serves every group:
    the tokens' w_i h_i / τ sit in their group's block of columns. With ``logits`` None the raw logits are
    ``head(h_i)``, computed ``chunk_tokens`` tokens at a time."""
    if logits is None and head is None:
        raise ValueError("lm_head_gradient_parts: pass the logits or the lm_head that computes them")
    keep = weights != 0
    vocab = logits.shape[-1] if logits is not None else head.weight.shape[0]
    width = hidden.shape[-1]
    parts = torch.zeros(vocab, count * width, dtype=torch.float32, device=hidden.device)
    if bool(keep.any()):
        scaled = (weights[keep] / temperature).unsqueeze(1) * hidden[keep].float()  # (M, d): w_i h_i / τ
        blocks = torch.zeros(scaled.shape[0], count * width, dtype=torch.float32, device=hidden.device)
        columns = groups[keep].long().unsqueeze(1) * width + torch.arange(width, device=hidden.device)
        blocks.scatter_(1, columns, scaled)  # (M, count·d), each row in its group's block
        parts.index_add_(0, targets[keep].long(), blocks)  # the e_{a_i} h_iᵀ terms
        kept = logits[keep] if logits is not None else hidden[keep]
        for start in range(0, blocks.shape[0], chunk_tokens):
            raw = kept[start:start + chunk_tokens]
            if logits is None:
                raw = head(raw.to(head.weight.dtype))
            probs = torch.softmax(raw.float() / temperature, dim=-1)  # (m, V)
            parts.sub_(probs.T @ blocks[start:start + chunk_tokens])  # the π_i h_iᵀ terms
    return parts.view(vocab, count, width).transpose(0, 1)


def lm_head_gradient_part(hidden, logits, targets, weights, temperature: float, chunk_tokens: int = 256
                          ) -> torch.Tensor:
    """(V, d) Σ_i w_i (e_{a_i} − softmax(z_i/τ)) h_iᵀ / τ over the tokens with w_i ≠ 0 (one group)."""
    return lm_head_gradient_parts(hidden, logits, targets, weights, torch.zeros_like(targets), 1, temperature,
                                  chunk_tokens)[0]


class EnergySplit:
    """Accumulates G_neg and G_pos over the micro-batches of one update attempt."""

    def __init__(self):
        self.parts: torch.Tensor | None = None  # (2, V, d): G_neg, G_pos

    def add(self, hidden, logits, targets, log_ratio, advantages, mask, total_tokens: float, temperature: float,
            clip_eps: float, clip_eps_high: float | None = None, head=None) -> None:
        weights = token_gradient_weights(log_ratio, advantages, mask, total_tokens, clip_eps, clip_eps_high)
        sign = advantages.float().unsqueeze(1).expand_as(weights)
        weights = torch.where(sign != 0, weights, 0.0)
        parts = lm_head_gradient_parts(hidden, logits, targets, weights, (sign > 0).long(), len(PARTS),
                                       temperature, head=head)
        self.parts = parts if self.parts is None else self.parts.add_(parts)

    def metrics(self) -> dict[str, float]:
        """``energy/neg`` = ‖G_neg‖², ``energy/pos`` = ‖G_pos‖², ``energy/total`` = ‖G_neg + G_pos‖² (the
        probe's g_t of the output projection), ``energy/neg_share`` = ‖G_neg‖² / (‖G_neg‖² + ‖G_pos‖²)."""
        if self.parts is None:
            return {}
        neg, pos = self.parts[0], self.parts[1]
        e_neg = float(torch.linalg.vector_norm(neg).square())
        e_pos = float(torch.linalg.vector_norm(pos).square())
        total = float(torch.linalg.vector_norm(neg + pos).square())
        share = e_neg / (e_neg + e_pos) if e_neg + e_pos > 0 else None
        return {"energy/neg": e_neg, "energy/pos": e_pos, "energy/total": total, "energy/neg_share": share}
