"""Measure the architectural constants of Theorem 1 (paper §4.2.1, Appendix A.2–A.4, Table 2) on any
Hugging Face causal LM, follow C_struct during training (:func:`c_struct_p95`, Fig. 6), and check Theorem 2
on live training batches (:func:`theorem2_terms`, §4.2.2, Appendix B).

Notation (paper §4.2): for a token position ``i`` of a held-out text,

* ``h_i``  — the post-norm hidden state entering the lm_head (``h_{L,i}``), ``d_model`` its width;
* ``x_i``  — the input of an intermediate linear layer (q/k/v/o, gate/up/down) at position ``i``;
* ``y_i``  — that layer's output at position ``i``, ``z_i`` the final logits at position ``i``;
* ``J_i = ∂z_i/∂y_i`` — the composite Jacobian (``d_vocab × d_out``), taken at the SAME position ``i``;
* ``π = softmax(z_i)``, ``a_i`` the actual next token of the text, ``E_i = e_{a_i} − π``
  (the error signal of Proposition 1 with ``r_i·Â_i = 1``; every ratio below is invariant to that scale).

What is measured, per (token, layer) pair unless said otherwise:

* ``α_min = ½·min_k s_k²`` (Eq. 27), ``s`` the per-coordinate scale of the final norm (the module whose
  output feeds the lm_head), a model constant; and the empirical ``‖h_i‖²/d_model`` beside it;
* ``β_i = ‖x_i‖²/d_model`` (Eq. 4 is written with ``d_model`` for every layer; we keep that normalisation
  so that ``C_struct`` below bounds the gradient ratio exactly, and also report ``‖x_i‖²/in_features``,
  the mean square input, which differs for down_proj and for o_proj when heads·head_dim ≠ d_model);
* Assumption 1: ``C_expected = E_{j∼π}‖(J_i)_{j,:}‖²`` (i) and ``C_target = ‖(J_i)_{a_i,:}‖²`` (ii);
  the per-token ``C_i = max(C_expected, C_target)`` is the smallest C satisfying both at that token;
* ``C_struct,i = 4·β_i·C_i/α_min`` (Theorem 1);
* Theorem 1 check: the per-token ratio ``‖G_int‖²/‖G_lm‖² = ‖J_iᵀE_i‖²‖x_i‖² / (‖E_i‖²‖h_i‖²)``
  (Proposition 1's rank-1 forms, Eq. 3, 36) against ``C_struct/(1−π(a_i))²`` (Eq. 5).

Per-token versus global (Appendix A.4). The paper's Lemma 1 and Assumption 1 state uniform constants, but
Table 2 reports each as a median and 95th percentile "collected via forward-pass activations and Jacobian
estimates", i.e. as distributions of per-token values. We follow Table 2: ``β`` and ``C`` are per-(token,
layer) values, ``α_min`` is the model constant of Eq. 27, and ``C_struct`` is computed per (token, layer)
before taking percentiles. Table 2's own ``C_struct`` columns equal ``4 × Med(β/α) × Med(C)`` and
``4 × P95(β/α) × P95(C)`` (they recompose from the other columns to three digits), so we report that
composed form as well (``paper_style``).

Jacobian rows by vector–Jacobian products. A zero tensor ``δ`` that requires grad is added, through a
forward hook, to each selected linear layer's output at position ``i`` only; ``∂(c·z_i)/∂δ = J_iᵀc``.
Perturbing position ``i`` alone is what excludes the cross-position terms (the effect of ``y_{<i}`` on
``z_i`` through attention), matching the paper's per-token analysis. Because the perturbations are zero,
one backward pass gives ``J_iᵀc`` for every selected layer at once; different cotangents ``c`` ride in
different copies of the prefix in one batch. The text is cut after position ``i`` (causal masking makes
``z_i`` independent of later tokens), and only the last position's logits are computed.

Estimator of (i). With a vocabulary of at most ``exact_vocab_max`` tokens it is exact,
``Σ_j π_j‖row_j‖²`` over all rows. Otherwise ``S`` rows ``j_1..j_S`` are drawn i.i.d. from ``π`` (with
replacement); the unbiased estimate is their mean squared row norm and its standard error
``std(ddof=1)/√S``.

Over 450 lines for now: constants, bounds and the live monitor share this file; issue 12 splits it into
``theory/``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

# ----------------------------------------------------------------------------------------------------------
# Finding the parts of a model
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSite:
    """One intermediate linear layer whose Jacobian and input are measured."""

    name: str
    """Full module name, e.g. ``model.layers.3.self_attn.q_proj``."""
    layer_index: int
    """Index of the decoder layer that holds it."""
    layer_type: str
    """Name inside its decoder layer with digits replaced by ``*``, e.g. ``self_attn.q_proj``."""
    module: nn.Linear
    """The linear module itself."""


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of transformer blocks (``model.model.layers`` for Qwen2/Llama)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return decoder.layers
    wanted = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == wanted]
    if not candidates:
        raise ValueError("could not find the decoder layers: no ModuleList of length config.num_hidden_layers")
    return candidates[0]


def parse_layer_spec(spec: str, num_layers: int) -> list[int]:
    """``"all"`` or a comma list of indices (negative counts from the end), e.g. ``"0,5,-1"``."""
    if spec.strip().lower() == "all":
        return list(range(num_layers))
    indices: list[int] = []
    for part in spec.split(","):
        try:
            index = int(part)
        except ValueError:
            raise ValueError(f"--layers: {part!r} is not an integer; use 'all' or e.g. '0,5,-1'") from None
        if not -num_layers <= index < num_layers:
            raise ValueError(f"--layers: index {index} is outside the model's {num_layers} layers")
        indices.append(index % num_layers)
    return sorted(set(indices))


def intermediate_linear_sites(model: nn.Module, layer_indices: Sequence[int]) -> list[LinearSite]:
    """Every ``nn.Linear`` inside the chosen decoder layers (attention and MLP projections)."""
    layers = find_decoder_layers(model)
    full_names = {module: name for name, module in model.named_modules()}
    sites = []
    for index in layer_indices:
        for name, module in layers[index].named_modules():
            if isinstance(module, nn.Linear):
                sites.append(LinearSite(full_names[module], index, re.sub(r"\d+", "*", name), module))
    if not sites:
        raise ValueError("no nn.Linear layers found in the selected decoder layers")
    return sites


def find_final_norm(model: nn.Module, example_ids: torch.Tensor) -> tuple[str, nn.Module]:
    """The module whose output is the lm_head input, found by one forward pass (generic, no names).

    Among modules whose output equals the lm_head input exactly, the last one with a 1-D weight of width
    ``d_model`` wins, else the last whose class name contains "Norm"."""
    lm_head = model.get_output_embeddings()
    outputs: list[tuple[str, nn.Module, torch.Tensor]] = []
    captured: dict[str, torch.Tensor] = {}
    handles = [lm_head.register_forward_pre_hook(lambda m, inp: captured.__setitem__("h", inp[0].detach()))]
    for name, module in model.named_modules():
        if module is lm_head or module is model:
            continue

        def record(mod, inp, out, name=name):
            if isinstance(out, torch.Tensor):
                outputs.append((name, mod, out.detach()))

        handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(input_ids=example_ids)
    finally:
        for handle in handles:
            handle.remove()
    h = captured["h"]
    matches = [(n, m) for n, m, out in outputs if out.shape == h.shape and torch.equal(out, h)]
    d_model = h.shape[-1]
    for name, module in reversed(matches):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() == d_model:
            return name, module
    for name, module in reversed(matches):
        if "norm" in type(module).__name__.lower():
            return name, module
    raise ValueError("could not identify the final norm feeding the lm_head")


def final_norm_scale(norm: nn.Module, d_model: int) -> torch.Tensor:
    """Per-coordinate scale ``s`` of the final norm (``w^lm`` of Eq. 22), in float32.

    RMSNorm-like modules are probed with an all-ones input, whose RMS is 1, so the output is the
    effective scale (``w`` for Qwen2/Llama, ``1 + w`` for Gemma-style norms) up to a factor
    ``1/√(1+ε)``. ``nn.LayerNorm`` would map that input to its bias, so its ``weight`` is read instead."""
    param = next(norm.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    if isinstance(norm, nn.LayerNorm):
        if norm.weight is None:
            return torch.ones(d_model)
        return norm.weight.detach().float().cpu()
    with torch.no_grad():
        probe = norm(torch.ones(1, 1, d_model, dtype=dtype, device=device))
    return probe.reshape(-1).float().cpu()


def alpha_min_from_scale(scale: torch.Tensor) -> float:
    """``α_min = ½·min_k s_k²`` (Eq. 27)."""
    return 0.5 * float(scale.float().pow(2).min())


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
# Derived per-(token, layer) quantities and Table 2 summaries
# ----------------------------------------------------------------------------------------------------------


def percentiles(values: torch.Tensor) -> dict[str, float]:
    """Median and 95th percentile (linear interpolation), plus min and max."""
    values = values.double()
    return {
        "median": float(values.quantile(0.5)),
        "p95": float(values.quantile(0.95)),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def per_pair_table(measurement: ConstantsMeasurement) -> dict[str, torch.Tensor]:
    """Every derived quantity as a float64 tensor of shape ``(tokens, sites)``."""
    def grid(name):
        return torch.tensor([getattr(t, name) for t in measurement.tokens], dtype=torch.float64)

    def column(name):
        return grid(name).unsqueeze(1).expand(-1, len(measurement.sites))

    in_features = torch.tensor([s["in_features"] for s in measurement.sites], dtype=torch.float64)
    x_sq = grid("input_sq_norms")
    beta = x_sq / measurement.d_model
    c_expected, c_target = grid("c_expected"), grid("c_target")
    c = torch.maximum(c_expected, c_target)
    c_struct = 4.0 * beta * c / measurement.alpha_min
    grad_int_sq = grid("projected_error_sq_norm") * x_sq  # ‖J_iᵀE_i‖²‖x_i‖², Eq. 44
    grad_lm_sq = column("error_sq_norm") * column("lm_input_sq_norm")  # ‖E_i‖²‖h_i‖², Eq. 37
    confidence = (1.0 - column("prob_target")).pow(2)
    return {
        "beta": beta,
        "mean_square_input": x_sq / in_features,
        "beta_over_alpha": beta / measurement.alpha_min,
        "c_expected": c_expected,
        "c_expected_se": grid("c_expected_se"),
        "c_target": c_target,
        "c": c,
        "c_struct": c_struct,
        "grad_ratio": grad_int_sq / grad_lm_sq,
        "confidence_factor": confidence,
        "bound": c_struct / confidence,
    }


SUMMARY_QUANTITIES = ("beta", "mean_square_input", "beta_over_alpha", "c_expected", "c_target", "c",
                      "c_struct", "grad_ratio")


def summarise_pairs(table: dict[str, torch.Tensor], mask: torch.Tensor, global_c_struct_p95: float) -> dict:
    """Percentiles of each quantity over the (token, site) pairs selected by ``mask``, Table 2's
    composed C_struct, and the Theorem 1 check (fraction of pairs with ratio ≤ bound)."""
    pick = {name: values[mask] for name, values in table.items()}
    summary = {name: percentiles(pick[name]) for name in SUMMARY_QUANTITIES}
    summary["paper_style_c_struct"] = {
        q: 4.0 * summary["beta_over_alpha"][q] * summary["c"][q] for q in ("median", "p95")
    }
    se = pick["c_expected_se"]
    relative_se = se / pick["c_expected"].clamp_min(1e-300)
    summary["c_expected_relative_se_median"] = float(relative_se.quantile(0.5))
    summary["theorem1"] = {
        "pairs": int(mask.sum()),
        "within_per_token_bound": float((pick["grad_ratio"] <= pick["bound"]).double().mean()),
        "within_global_p95_bound": float(
            (pick["grad_ratio"] <= global_c_struct_p95 / pick["confidence_factor"]).double().mean()
        ),
        "ratio_over_bound": percentiles(pick["grad_ratio"] / pick["bound"]),
    }
    return summary


def summarise(measurement: ConstantsMeasurement) -> dict:
    """Table 2 for the whole model (``overall``) and per layer type, plus the α side of Lemma 1."""
    table = per_pair_table(measurement)
    all_pairs = torch.ones_like(table["beta"], dtype=torch.bool)
    global_p95 = percentiles(table["c_struct"])["p95"]
    types = list(dict.fromkeys(s["layer_type"] for s in measurement.sites))
    by_type = {}
    for layer_type in types:
        column_mask = torch.tensor([s["layer_type"] == layer_type for s in measurement.sites])
        by_type[layer_type] = summarise_pairs(table, all_pairs & column_mask.unsqueeze(0), global_p95)
    h_sq = torch.tensor([t.lm_input_sq_norm for t in measurement.tokens], dtype=torch.float64)
    return {
        "alpha_min": measurement.alpha_min,
        "lm_input_mean_square": percentiles(h_sq / measurement.d_model),
        "prob_target": percentiles(torch.tensor([t.prob_target for t in measurement.tokens])),
        "overall": summarise_pairs(table, all_pairs, global_p95),
        "by_layer_type": by_type,
    }


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
