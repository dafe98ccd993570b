"""Relative weight change per component, the measurement behind the DWD phenomenon (paper §4.1, Fig. 1).

relative_weight_change(component) = ‖W_t − W_{t−Δ}‖_F / ‖W_ref‖_F, with W_ref the weights at the start of
training and the norms taken over all parameters of the component (all layers together).
"""

from __future__ import annotations

import math

import torch

COMPONENTS = ("lm_head", "attn", "mlp", "embed", "norm", "other")


def component_of(name: str, param: torch.Tensor, model) -> str:
    """Which component a parameter belongs to, from its name and the model's output embedding."""
    head = model.get_output_embeddings()
    if head is not None and param is head.weight:
        return "lm_head"  # with tied embeddings the shared matrix is reported as lm_head
    lowered = name.lower()
    if "embed" in lowered or "wte" in lowered or "wpe" in lowered:
        return "embed"
    if "norm" in lowered or ".ln_" in lowered:
        return "norm"
    if "attn" in lowered or "attention" in lowered:
        return "attn"
    if "mlp" in lowered or "ffn" in lowered or "feed_forward" in lowered:
        return "mlp"
    if "lm_head" in lowered:
        return "lm_head"
    return "other"


class WeightChangeProfiler:
    """Keeps one snapshot of the weights and reports the relative change per component every Δ updates.

    Memory: one copy of the tracked weights (on the CPU when ``snapshot_on_cpu``), plus one float per component.
    """

    def __init__(self, model, snapshot_on_cpu: bool = True):
        self.snapshot_on_cpu = snapshot_on_cpu
        self._params: dict[str, tuple[str, torch.Tensor]] = {}
        seen: set[int] = set()
        for name, param in model.named_parameters():
            if id(param) in seen:  # tied weights are tracked once
                continue
            seen.add(id(param))
            self._params[name] = (component_of(name, param, model), param)
        self._reference_sq = self._component_norms_squared({n: p for n, (_, p) in self._params.items()})
        self._snapshot = self._take_snapshot()

    def _take_snapshot(self) -> dict[str, torch.Tensor]:
        device = "cpu" if self.snapshot_on_cpu else None
        return {n: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
                for n, (_, p) in self._params.items()}

    def _component_norms_squared(self, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for name, tensor in tensors.items():
            component = self._params[name][0]
            totals[component] = totals.get(component, 0.0) + float(tensor.detach().float().pow(2).sum())
        return totals

    @torch.no_grad()
    def measure(self, sampled_ids: torch.Tensor | None = None) -> dict[str, float]:
        """Relative change of each component since the last call (or since construction); then re-snapshot.

        With ``sampled_ids`` (the token ids sampled since the last call) also ``lm_head_sampled``: the change of
        just those rows of the lm_head, ‖W_t[S] − W_{t−Δ}[S]‖_F / ‖W_{t−Δ}[S]‖_F. Under tied embeddings the
        whole 49k-row matrix dilutes what happens to the few hundred rows a batch actually samples."""
        change_sq: dict[str, float] = {}
        extra: dict[str, float] = {}
        for name, (component, param) in self._params.items():
            previous = self._snapshot[name]
            diff = param.detach().to(previous.device, torch.float32) - previous
            change_sq[component] = change_sq.get(component, 0.0) + float(diff.pow(2).sum())
            if component == "lm_head" and sampled_ids is not None and diff.dim() == 2 and sampled_ids.numel():
                rows = sampled_ids.to(previous.device).long()
                extra["lm_head_sampled"] = float(diff.index_select(0, rows).norm()) / max(
                    float(previous.index_select(0, rows).norm()), 1e-12)
            previous.copy_(param.detach())
        out = {c: math.sqrt(change_sq[c]) / max(math.sqrt(self._reference_sq[c]), 1e-12) for c in change_sq}
        return {**out, **extra}

    def state_dict(self) -> dict:
        return {"snapshot": {n: t.clone() for n, t in self._snapshot.items()}, "reference_sq": self._reference_sq}

    def load_state_dict(self, state: dict) -> None:
        self._reference_sq = dict(state["reference_sq"])
        for name, tensor in state["snapshot"].items():
            self._snapshot[name].copy_(tensor)
