"""Log-probabilities of the sampled tokens without the full logits: the lm_head applied a chunk of tokens at a
time, in the forward pass and again in the backward pass.

The loss needs one number per token, log π(a_t | prefix), but the usual path materialises every token's logits
(tokens × vocabulary) in float32, a softmax of the same size and, in the backward pass, a gradient of the same
size again. With Gemma-3's 262,144-row lm_head, 1,024 tokens make each of those about 1 GB. Here the model runs
with its lm_head replaced by the identity, so it returns the lm_head's input h_L (tokens × hidden), and
:class:`ChunkedTokenLogprobs` computes ``log_softmax(h_L Wᵀ + b)[a_t]`` for ``chunk`` tokens at a time, keeping
only h_L for the backward pass, where each chunk's logits are computed once more. Peak memory then grows with
``chunk`` × vocabulary, not tokens × vocabulary; the price is one more lm_head matmul per token.

The lm_head's weight gradient is still accumulated into the weight's ``.grad`` (the tied embedding's included),
so :class:`dgg.probe.LMHeadGradProbe` reads the same g_t. Under autocast the matmuls run in the autocast dtype,
as the model's own lm_head would; softmax, log-probabilities and gradients are accumulated in float32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class _Identity(nn.Module):
    """Stands in for the lm_head while the model runs, so that its "logits" are the lm_head's input."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextlib.contextmanager
def lm_head_bypassed(model):
    """Within the block the model returns h_L in place of logits; yields the real lm_head."""
    head = model.get_output_embeddings()
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None):
        raise NotImplementedError("chunked log-probabilities do not apply final_logit_softcapping; "
                                  "set train.logprob_chunk=0 for this model")
    model.set_output_embeddings(_Identity())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)


def _matmul_dtype(device: torch.device) -> torch.dtype:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  temperature: float) -> torch.Tensor:
    """(c, V) float32 tempered logits of ``c`` tokens; ``weight`` is already in the matmul dtype."""
    logits = (hidden.to(weight.dtype) @ weight.T).float()
    if bias is not None:
        logits = logits + bias.float()
    return logits / temperature


class ChunkedTokenLogprobs(torch.autograd.Function):
    """``log_softmax((hidden @ weight.T + bias) / temperature)[arange, targets]``, ``chunk`` rows at a time.

    hidden (T, d), weight (V, d), bias (V,) or None, targets (T,) → (T,) float32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, chunk: int):
        dtype = _matmul_dtype(hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            matmul_weight = weight.to(dtype)
            out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                logits = _chunk_logits(hidden[rows], matmul_weight, bias, temperature)
                out[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - torch.logsumexp(logits, dim=1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if bias is not None and need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            matmul_weight = weight.to(ctx.dtype)
            for start in range(0, hidden.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                # d log p(a) / d logits = onehot(a) − softmax; then through the temperature.
                grad_logits = torch.softmax(_chunk_logits(hidden[rows], matmul_weight, bias, ctx.temperature), 1)
                grad_logits.mul_(-grad_out[rows, None])
                grad_logits[torch.arange(grad_logits.shape[0], device=grad_logits.device), targets[rows]] += \
                    grad_out[rows]
                grad_logits.div_(ctx.temperature)
                if grad_hidden is not None:
                    grad_hidden[rows] = (grad_logits.to(ctx.dtype) @ matmul_weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (grad_logits.to(ctx.dtype).T @ hidden[rows].to(ctx.dtype)).float()
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None)


def chunked_token_logprobs(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, temperature: float,
                           chunk: int) -> torch.Tensor:
    """(N, R) log π of ``targets`` (N, R) from the lm_head input ``hidden`` (N, R, d) and the lm_head ``head``."""
    rows, length = targets.shape
    flat = ChunkedTokenLogprobs.apply(hidden.reshape(rows * length, -1), head.weight,
                                      getattr(head, "bias", None), targets.reshape(-1), temperature, chunk)
    return flat.view(rows, length)
