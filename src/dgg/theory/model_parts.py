"""Finding the parts of a model that Theorem 1 talks about: decoder layers, intermediate linear layers, the final
norm that feeds the lm_head and its scale (α_min of Eq. 27)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

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
