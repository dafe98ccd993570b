"""C_struct during training (Appendix A.4, Fig. 6): a quick 95th-percentile summary on a fixed probe set."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from dgg.theory.measurement import ConstantsConfig, measure_constants
from dgg.theory.summary import per_pair_table, percentiles

# ----------------------------------------------------------------------------------------------------------


# C_struct during training (Appendix A.4, Fig. 6): a quick summary on a fixed probe set
# ----------------------------------------------------------------------------------------------------------


def encode_probe_texts(tokenizer, texts: Sequence[str], max_length: int = 256, device=None) -> list[torch.Tensor]:
    """Token ids of each text (truncated to ``max_length``), dropping texts with fewer than 2 tokens.

    The same encoding as ``dgg constants --prompts``, so both measure the same probe set."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    encoded = [torch.tensor(tokenizer(text, truncation=True, max_length=max_length).input_ids, device=device)
               for text in texts]
    encoded = [ids for ids in encoded if ids.shape[0] >= 2]
    if not encoded:
        raise ValueError("no held-out text has at least 2 tokens")
    return encoded


def c_struct_p95(
    model: nn.Module,
    probe_ids: Sequence[torch.Tensor],
    *,
    layers: str = "all",
    tokens: int = 8,
    seed: int = 0,
    samples: int = 16,
    exact_vocab_max: int = 1024,
    batch_size: int = 128,
) -> dict[str, float]:
    """95th percentile and median of the per-(token, layer) ``C_struct`` of Theorem 1 on a fixed probe set,
    for logging its trajectory during training (paper Appendix A.4, Fig. 6).

    Runs :func:`measure_constants` with ``ConstantsConfig(tokens, samples, exact_vocab_max, layers,
    batch_size, seed)``, so the numbers equal ``summary.overall.c_struct`` of ``dgg constants`` with the same
    options on the same texts (``batch_size`` changes only speed and memory). The same ``seed`` picks the same
    positions every call, so successive values differ only because the weights moved.

    ``probe_ids`` are 1-D id tensors on the model's device (see :func:`encode_probe_texts`). The model's
    train/eval mode and every parameter's ``requires_grad`` are restored afterwards; parameter ``.grad``
    fields are not touched (only zero perturbations receive gradients). Call it between updates, not between
    a backward pass and its optimizer step, to keep the measurement's activations out of that step's memory.

    Returns ``c_struct_p95``, ``c_struct_median``, ``grad_ratio_p95`` (the measured ‖G_int‖²/‖G_lm‖², Eq. 5),
    ``tokens`` (positions measured) and ``seconds``.
    """
    config = ConstantsConfig(tokens=tokens, samples=samples, exact_vocab_max=exact_vocab_max, layers=layers,
                             batch_size=batch_size, seed=seed)
    if not probe_ids:
        raise ValueError("probe_ids is empty: give at least one text of 2 or more tokens")
    was_training = model.training
    needs_grad = [param.requires_grad for param in model.parameters()]
    started = time.perf_counter()
    try:
        measurement = measure_constants(model, probe_ids, config)
    finally:
        model.train(was_training)
        for param, flag in zip(model.parameters(), needs_grad):
            param.requires_grad_(flag)
    table = per_pair_table(measurement)
    c_struct = percentiles(table["c_struct"].flatten())
    return {
        "c_struct_p95": c_struct["p95"],
        "c_struct_median": c_struct["median"],
        "grad_ratio_p95": percentiles(table["grad_ratio"].flatten())["p95"],
        "tokens": float(len(measurement.tokens)),
        "seconds": time.perf_counter() - started,
    }


# ----------------------------------------------------------------------------------------------------------
