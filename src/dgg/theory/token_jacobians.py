"""One token of a held-out text: a forward capture and same-position vector–Jacobian products, giving β_i, C_i
and the per-token gradient ratio of Proposition 1 (see ``dgg.theory`` for the notation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dgg.theory.model_parts import LinearSite

# ----------------------------------------------------------------------------------------------------------


# One token: forward capture and same-position vector–Jacobian products
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LastPositionPass:
    """What one forward pass over a prefix yields at its last position ``i``."""

    logits: torch.Tensor
    """``z_i`` for every copy in the batch, float32, shape ``(copies, vocab)``."""
    lm_input: torch.Tensor
    """``h_i`` of the first copy, float32, shape ``(d_model,)``."""
    site_inputs: list[torch.Tensor]
    """``x_i`` of the first copy for each site, float32, each ``(in_features,)``."""


def last_position_pass(
    model: nn.Module,
    prefix_ids: torch.Tensor,
    sites: Sequence[LinearSite],
    copies: int = 1,
    deltas: Sequence[torch.Tensor] | None = None,
) -> LastPositionPass:
    """Forward ``copies`` copies of ``prefix_ids`` (shape ``(T,)``), capturing inputs at the last position.

    If ``deltas`` is given, ``deltas[s]`` (shape ``(copies, out_features)``) is added to site ``s``'s output
    at the last position only, so that gradients w.r.t. it are same-position VJPs."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    lm_head = model.get_output_embeddings()
    handles.append(
        lm_head.register_forward_pre_hook(
            lambda m, inp: captured.__setitem__("h", inp[0][0, -1].detach().float())
        )
    )
    for index, site in enumerate(sites):

        def capture(mod, inp, index=index):
            captured[f"x{index}"] = inp[0][0, -1].detach().float()

        handles.append(site.module.register_forward_pre_hook(capture))
        if deltas is not None:

            def perturb(mod, inp, out, delta=deltas[index]):
                last = out[:, -1:, :] + delta.unsqueeze(1).to(out.dtype)
                return torch.cat([out[:, :-1, :], last], dim=1)

            handles.append(site.module.register_forward_hook(perturb))
    input_ids = prefix_ids.unsqueeze(0).expand(copies, -1)
    try:
        try:
            logits = model(input_ids=input_ids, logits_to_keep=1).logits
        except TypeError:  # older models without logits_to_keep
            logits = model(input_ids=input_ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return LastPositionPass(
        logits=logits[:, -1, :].float(),
        lm_input=captured["h"],
        site_inputs=[captured[f"x{index}"] for index in range(len(sites))],
    )


def same_position_vjps(
    model: nn.Module,
    prefix_ids: torch.Tensor,
    sites: Sequence[LinearSite],
    cotangents: torch.Tensor,
    batch_size: int = 32,
) -> list[torch.Tensor]:
    """``J_iᵀc`` for every cotangent row ``c`` (shape ``(K, vocab)``) and every site, ``i`` the last position.

    Returns one float32 tensor ``(K, out_features)`` per site. Each chunk of at most ``batch_size``
    cotangents costs one forward and one backward over that many copies of the prefix."""
    device = prefix_ids.device
    dtype = next(model.parameters()).dtype
    results: list[list[torch.Tensor]] = [[] for _ in sites]
    for start in range(0, cotangents.shape[0], batch_size):
        chunk = cotangents[start : start + batch_size].to(device)
        deltas = [
            torch.zeros(chunk.shape[0], s.module.out_features, device=device, dtype=dtype, requires_grad=True)
            for s in sites
        ]
        with torch.enable_grad():
            out = last_position_pass(model, prefix_ids, sites, copies=chunk.shape[0], deltas=deltas)
            objective = (out.logits * chunk.float()).sum()
            grads = torch.autograd.grad(objective, deltas)
        for index, grad in enumerate(grads):
            results[index].append(grad.float())
    return [torch.cat(parts) for parts in results]


@dataclass
class TokenMeasurement:
    """All per-token quantities at one position ``i`` of one text; per-site lists follow the site order."""

    text_index: int
    """Which text the token comes from."""
    position: int
    """Position ``i`` whose logits predict ``target``."""
    target: int
    """``a_i``: the actual next token of the text."""
    prob_target: float
    """``π_θ(a_i)``."""
    lm_input_sq_norm: float
    """``‖h_i‖²``."""
    error_sq_norm: float
    """``‖E_i‖² = ‖e_{a_i} − π‖²``."""
    input_sq_norms: list[float] = field(default_factory=list)
    """``‖x_i‖²`` per site."""
    c_expected: list[float] = field(default_factory=list)
    """Assumption 1(i), ``E_{j∼π}‖(J_i)_{j,:}‖²`` (exact or sampled) per site."""
    c_expected_se: list[float] = field(default_factory=list)
    """Standard error of ``c_expected`` (0 when exact) per site."""
    c_target: list[float] = field(default_factory=list)
    """Assumption 1(ii), ``‖(J_i)_{a_i,:}‖²`` per site."""
    projected_error_sq_norm: list[float] = field(default_factory=list)
    """``‖J_iᵀE_i‖²`` per site."""


def expected_row_energy(row_sq_norms: torch.Tensor, probs: torch.Tensor) -> float:
    """Exact Assumption 1(i): ``Σ_j π_j‖(J_i)_{j,:}‖²`` over all vocabulary rows."""
    return float((probs.double() * row_sq_norms.double()).sum())


def sampled_row_energy(row_sq_norms: torch.Tensor) -> tuple[float, float]:
    """Monte-Carlo Assumption 1(i) from rows drawn i.i.d. from ``π``: (mean, standard error)."""
    values = row_sq_norms.double()
    if values.numel() < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(values.std(unbiased=True) / math.sqrt(values.numel()))


def measure_token(
    model: nn.Module,
    ids: torch.Tensor,
    position: int,
    sites: Sequence[LinearSite],
    *,
    samples: int,
    exact: bool,
    generator: torch.Generator,
    batch_size: int = 32,
    text_index: int = 0,
) -> TokenMeasurement:
    """Measure every per-token quantity at ``position`` of ``ids`` (the next token ``ids[position+1]`` is
    ``a_i``): one no-grad forward for ``π``, ``h_i`` and ``x_i``, then the VJPs (exact: all ``V`` rows;
    sampled: ``samples`` rows ``j ∼ π``), plus the ``a_i`` row and ``E_i``."""
    if not 0 <= position < ids.shape[0] - 1:
        raise ValueError(f"position {position} has no next token in a text of {ids.shape[0]} tokens")
    prefix = ids[: position + 1]
    target = int(ids[position + 1])
    with torch.no_grad():
        forward = last_position_pass(model, prefix, sites)
    probs = torch.softmax(forward.logits[0].double(), dim=-1).float().cpu()
    vocab = probs.shape[0]
    error = -probs.clone()
    error[target] += 1.0
    if exact:
        rows = torch.arange(vocab)
    else:
        rows = torch.multinomial(probs.double(), samples, replacement=True, generator=generator)
    one_hots = torch.nn.functional.one_hot(rows, vocab).float()
    # Cotangents: the rows, then e_{a_i} (row a_i), then E_i.
    cotangents = torch.cat([one_hots, torch.nn.functional.one_hot(torch.tensor([target]), vocab).float(),
                            error.unsqueeze(0)])
    vjps = same_position_vjps(model, prefix, sites, cotangents, batch_size=batch_size)
    measurement = TokenMeasurement(
        text_index=text_index,
        position=position,
        target=target,
        prob_target=float(probs[target]),
        lm_input_sq_norm=float(forward.lm_input.pow(2).sum()),
        error_sq_norm=float(error.double().pow(2).sum()),
    )
    for site_index, vjp in enumerate(vjps):
        row_sq = vjp[: rows.numel()].double().pow(2).sum(-1).cpu()
        if exact:
            c_expected, c_se = expected_row_energy(row_sq, probs), 0.0
        else:
            c_expected, c_se = sampled_row_energy(row_sq)
        measurement.input_sq_norms.append(float(forward.site_inputs[site_index].pow(2).sum()))
        measurement.c_expected.append(c_expected)
        measurement.c_expected_se.append(c_se)
        measurement.c_target.append(float(vjp[-2].double().pow(2).sum()))
        measurement.projected_error_sq_norm.append(float(vjp[-1].double().pow(2).sum()))
    return measurement


# ----------------------------------------------------------------------------------------------------------
