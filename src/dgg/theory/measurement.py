"""Sampling token positions and the whole Table-2 measurement over a set of texts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dgg.theory.model_parts import (
    alpha_min_from_scale,
    final_norm_scale,
    find_decoder_layers,
    find_final_norm,
    intermediate_linear_sites,
    parse_layer_spec,
)
from dgg.theory.token_jacobians import TokenMeasurement, measure_token

# ----------------------------------------------------------------------------------------------------------


# Sampling tokens and the whole measurement
# ----------------------------------------------------------------------------------------------------------


def sample_token_positions(lengths: Sequence[int], count: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """``count`` distinct (text index, position) pairs drawn uniformly among positions with a next token,
    sorted; all of them if there are fewer."""
    pairs = [(t, p) for t, length in enumerate(lengths) for p in range(length - 1)]
    if not pairs:
        raise ValueError("the texts have no position with a next token (each needs at least 2 tokens)")
    if count >= len(pairs):
        return pairs
    chosen = torch.randperm(len(pairs), generator=generator)[:count]
    return sorted(pairs[int(k)] for k in chosen)


@dataclass(frozen=True)
class ConstantsConfig:
    """How to measure."""

    tokens: int = 64
    """Number of token positions sampled across the texts (each costs one forward + backward pass)."""
    samples: int = 16
    """Rows ``j ∼ π`` per token for the sampled estimator of Assumption 1(i)."""
    exact_vocab_max: int = 1024
    """Use the exact ``Σ_j π_j‖row_j‖²`` when the vocabulary has at most this many tokens."""
    layers: str = "all"
    """Decoder layers to measure: ``all`` or indices such as ``0,5,-1``."""
    batch_size: int = 32
    """Prefix copies per VJP forward/backward (memory knob)."""
    seed: int = 0
    """Seed for the token positions and the sampled rows."""

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 (a standard error needs two), got {self.samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.exact_vocab_max < 0:
            raise ValueError(f"exact_vocab_max must be >= 0, got {self.exact_vocab_max}")


@dataclass
class ConstantsMeasurement:
    """Raw measurements; :func:`summarise` turns them into Table 2."""

    d_model: int
    """Width of the lm_head input."""
    vocab_size: int
    """Rows of the logits."""
    final_norm: str
    """Name of the module feeding the lm_head."""
    alpha_min: float
    """``½·min_k s_k²`` of the final norm (Eq. 27)."""
    sites: list[dict]
    """Per site: name, layer_index, layer_type, in_features, out_features."""
    tokens: list[TokenMeasurement]
    """One entry per sampled token."""
    estimator: str
    """``exact`` or ``sampled``."""
    samples: int
    """Rows per token for the sampled estimator (0 when exact)."""


def measure_constants(
    model: nn.Module, texts_ids: Sequence[torch.Tensor], config: ConstantsConfig, progress=None
) -> ConstantsMeasurement:
    """Run every measurement over ``config.tokens`` positions sampled from ``texts_ids`` (1-D id tensors on
    the model's device). ``progress(done, total)`` is called after each token if given. The model is put in
    eval mode with ``requires_grad_(False)`` (only the zero perturbations need gradients) and left so."""
    model.eval()
    model.requires_grad_(False)  # only the δ perturbations need gradients
    generator = torch.Generator().manual_seed(config.seed)
    layers = find_decoder_layers(model)
    sites = intermediate_linear_sites(model, parse_layer_spec(config.layers, len(layers)))
    longest = max(texts_ids, key=lambda t: t.shape[0])
    norm_name, norm = find_final_norm(model, longest[: min(8, longest.shape[0])].unsqueeze(0))
    d_model = model.get_output_embeddings().in_features
    vocab = model.get_output_embeddings().out_features
    exact = vocab <= config.exact_vocab_max
    positions = sample_token_positions([t.shape[0] for t in texts_ids], config.tokens, generator)
    tokens = []
    for done, (text_index, position) in enumerate(positions, start=1):
        tokens.append(
            measure_token(model, texts_ids[text_index], position, sites, samples=config.samples, exact=exact,
                          generator=generator, batch_size=config.batch_size, text_index=text_index)
        )
        if progress is not None:
            progress(done, len(positions))
    return ConstantsMeasurement(
        d_model=d_model,
        vocab_size=vocab,
        final_norm=norm_name,
        alpha_min=alpha_min_from_scale(final_norm_scale(norm, d_model)),
        sites=[
            dict(name=s.name, layer_index=s.layer_index, layer_type=s.layer_type,
                 in_features=s.module.in_features, out_features=s.module.out_features)
            for s in sites
        ],
        tokens=tokens,
        estimator="exact" if exact else "sampled",
        samples=0 if exact else config.samples,
    )


# ----------------------------------------------------------------------------------------------------------
