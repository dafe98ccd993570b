"""The lm_head gradient probe: g_t = ‖G_lm‖²_F, the signal the gradient gate tests (paper §4.2, §5).

Proposition 1 (Eq. 3) writes the lm_head gradient of a batch as a sum of rank-1 terms,
``G_lm = Σ_i E_i h_{L,i}ᵀ``, with ``E_i`` the error signal at token ``i``'s logits and ``h_{L,i}`` the final
hidden state. Its squared Frobenius norm g_t lower-bounds the policy divergence (Theorem 2), and the gate of
Eq. 8 watches its increments. :class:`LMHeadGradProbe` reads g_t after ``backward()`` and before the optimizer
step, so a discarded update never touches the optimizer state.

Untied head: ``.grad`` of the head weight *is* G_lm (summed over micro-batches under gradient accumulation), so
g_t is its squared norm plus the bias's, if any. Nothing is hooked.

Tied embeddings (Qwen2.5 ≤ 3B, Llama-3.2, Gemma): the output projection and the input embedding share one
matrix W, so ``W.grad = G_lm + G_lookup``, where ``G_lookup`` is the gradient of the embedding lookup. A lookup
of token ``v`` at position ``i`` adds ``∂L/∂x_i`` (the gradient of the embedding output) to row ``v`` only, so
``G_lookup`` is zero outside the set ``S`` of looked-up ids. The probe records, per backward pass, the pairs
``(S, G_lookup[S])`` (a forward hook on the input embedding keeps the ids, a tensor hook on its output the
gradient rows, which are compacted with ``index_add`` at once), and at read time computes

    ‖G_lm‖² = Σ_{v ∉ S} ‖W.grad[v]‖² + Σ_{v ∈ S} ‖W.grad[v] − G_lookup[v]‖²

exactly, with no subtraction of large squared norms. The extra work per backward is O(tokens · hidden), far
below one lm_head matmul (tokens · hidden · vocab); the read is one pass over W.grad, like the untied case.
``tied="total"`` returns ‖W.grad‖² instead (nothing hooked).

What the tied split assumes: every lookup goes through the embedding *module* (a model called with
``inputs_embeds`` built elsewhere contributes no lookup gradient, so nothing is removed — correct; a direct
``F.embedding(ids, W)`` would be missed); :meth:`LMHeadGradProbe.reset` is called whenever the gradients are
zeroed, or stale lookups from the previous update would be subtracted; ``torch.unique`` in the backward hook
synchronises a GPU stream once per backward. Gradient checkpointing (re-entrant or not) and several forward
passes per backward are handled: one record per backpropagated embedding call.

Data parallel (the value is the same on every rank, and every rank must call :meth:`energy` — it is a
collective whenever communication is needed):

- DDP (``DistributedDataParallel``, or any wrapper that leaves the *mean* over ranks in ``.grad``): untied and
  ``"total"`` need no communication. For tied ``"output"`` the global ``G_lookup`` is the mean of the ranks'
  local ones, so the compact ``(ids, rows)`` of every rank are all-gathered (a size exchange plus
  ``world · max_unique_ids · (hidden + 1)`` numbers, far less than all-reducing a vocab × hidden matrix when
  batches hold fewer distinct tokens than the vocabulary), and the final scalar is all-reduced so that every
  rank holds bit-identical values even where ``index_add`` is non-deterministic (CUDA) — the gate's decision
  must never differ between ranks.
- FSDP2 (``fully_shard``; DTensor gradients): each rank sums its shard's squares, then an all-reduce over the
  sharded mesh dimensions gives the global value. Tied ``"output"`` is supported on a 1-D mesh with the weight
  sharded by rows (``Shard(0)``, FSDP2's default): the ``(ids, rows)`` are all-gathered as above and each rank
  corrects the rows it owns. Gradient reduction is assumed to be the mean (FSDP2's default).
- Ranks that do *not* average their gradients (independent runs sharing one process group) must not use tied
  ``"output"``: the probe would mix their lookups. Untied and ``"total"`` are purely local there.
- DeepSpeed ZeRO-3 parameters are refused at construction; under ZeRO-2 (or anything that frees ``.grad``
  after reducing it) the read raises because ``.grad`` is None. Use the host framework's own hook there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

TIED_MODES = ("output", "total")


@dataclass
class _LookupGradient:
    """The embedding-lookup gradient G_lookup of one backward pass, compact: only its non-zero rows.

    token_ids: (U,) distinct token ids, int64.
    rows: (U, hidden) float32, the gradient rows G_lookup[token_ids].
    """

    token_ids: torch.Tensor
    rows: torch.Tensor


def _compact(token_ids: torch.Tensor, rows: torch.Tensor) -> _LookupGradient:
    """Sum rows that share a token id: (N,), (N, hidden) -> (U,), (U, hidden)."""
    unique_ids, inverse = torch.unique(token_ids, return_inverse=True)
    summed = torch.zeros(unique_ids.numel(), rows.shape[1], dtype=torch.float32, device=rows.device)
    summed.index_add_(0, inverse, rows.float())
    return _LookupGradient(unique_ids, summed)


def _merge(parts: list[_LookupGradient]) -> _LookupGradient:
    if len(parts) == 1:
        return parts[0]
    return _compact(torch.cat([p.token_ids for p in parts]), torch.cat([p.rows for p in parts]))


def _squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """‖tensor‖² in float32 (bf16/fp16 gradients are reduced in float32)."""
    return torch.linalg.vector_norm(tensor, dtype=torch.float32).square()


def _energy_without_lookup(grad: torch.Tensor, lookup: _LookupGradient | None) -> torch.Tensor:
    """‖grad − G_lookup‖² for a dense (vocab, hidden) grad, G_lookup given only on its non-zero rows."""
    if lookup is None or lookup.token_ids.numel() == 0:
        return _squared_norm(grad)
    row_energy = torch.linalg.vector_norm(grad, dim=1, dtype=torch.float32).square()  # (vocab,)
    untouched = row_energy.index_fill(0, lookup.token_ids, 0.0).sum()
    corrected = _squared_norm(grad.index_select(0, lookup.token_ids).float() - lookup.rows)
    return untouched + corrected


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def _dtensor_squared_norm(grad) -> torch.Tensor:
    """Global ‖grad‖² of a DTensor: local shard energy, summed over the mesh dims that shard it."""
    from torch.distributed.tensor import Replicate, Shard

    energy = _squared_norm(grad.to_local())
    for mesh_dim, placement in enumerate(grad.placements):
        if isinstance(placement, Shard):
            torch.distributed.all_reduce(energy, group=grad.device_mesh.get_group(mesh_dim))
        elif not isinstance(placement, Replicate):
            raise RuntimeError(
                f"LMHeadGradProbe: the lm_head gradient has placement {placement} on mesh dim {mesh_dim}; "
                "only Shard and Replicate (reduced gradients) are supported"
            )
    return energy


def _all_gather_lookup(lookup: _LookupGradient, hidden: int, device, group) -> _LookupGradient:
    """The mean over ranks of the ranks' G_lookup, on every rank (the gradient DDP/FSDP2 average into .grad)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    count = torch.tensor([lookup.token_ids.numel()], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c.item()) for c in counts]
    longest = max(counts)
    if longest == 0:
        return _LookupGradient(torch.zeros(0, dtype=torch.int64, device=device),
                               torch.zeros(0, hidden, dtype=torch.float32, device=device))
    # all_gather needs equal shapes: pad to the longest, then cut each rank's part back to its length.
    ids = torch.zeros(longest, dtype=torch.int64, device=device)
    ids[: counts[dist.get_rank(group)]] = lookup.token_ids
    rows = torch.zeros(longest, hidden, dtype=torch.float32, device=device)
    rows[: counts[dist.get_rank(group)]] = lookup.rows
    all_ids = [torch.empty_like(ids) for _ in range(world)]
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(all_ids, ids, group=group)
    dist.all_gather(all_rows, rows, group=group)
    merged = _compact(torch.cat([i[:n] for i, n in zip(all_ids, counts, strict=True)]),
                      torch.cat([r[:n] for r, n in zip(all_rows, counts, strict=True)]))
    merged.rows.div_(world)
    return merged


def _unwrap(model: nn.Module) -> tuple[nn.Module, object | None]:
    """The inner model and the DDP process group, if ``model`` is a DistributedDataParallel wrapper."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, model.process_group
    return model, None


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next((name for name, m in model.named_modules() if m is module), type(module).__name__)


class LMHeadGradProbe:
    """Reads g_t = ‖G_lm‖²_F (Proposition 1, Eq. 3), the lm_head gradient energy of one update.

    Call :meth:`energy` after the last ``backward()`` of an update (all micro-batches) and before
    ``optimizer.step()``; call :meth:`reset` after each step or discard, together with ``zero_grad``.

    Args:
        model: a Hugging Face-style causal LM (``get_output_embeddings()`` returns the head, a Linear-like
            module with ``.weight`` and maybe ``.bias``), or a DDP wrapper around one.
        tied: what to measure when the head shares its weight with the input embedding. ``"output"`` (default):
            only the output projection's gradient G_lm of Eq. 3, with the embedding-lookup gradient removed
            exactly. ``"total"``: the whole ``.grad`` of the shared matrix. Ignored for an untied head.

    Use as a context manager (``with LMHeadGradProbe(model) as probe:``) or call :meth:`close` to remove hooks.
    """

    def __init__(self, model: nn.Module, tied: str = "output"):
        if tied not in TIED_MODES:
            raise ValueError(f"tied must be one of {TIED_MODES} (got {tied!r})")
        inner, self._ddp_group = _unwrap(model)
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise ValueError(
                f"model {type(inner).__name__} has no output embedding (lm_head) with a .weight: "
                "get_output_embeddings() must return the Linear-like head"
            )
        head_name = _module_name(inner, head)
        if not head.weight.requires_grad:
            raise ValueError(
                f"the lm_head ({head_name!r}) is frozen (weight.requires_grad=False, e.g. under LoRA), so it has "
                "no gradient to measure; unfreeze it or add it to the trainable modules"
            )
        if hasattr(head.weight, "ds_id"):
            raise ValueError(
                f"the lm_head ({head_name!r}) is a DeepSpeed ZeRO-3 partitioned parameter; its .grad is not "
                "materialised, so LMHeadGradProbe cannot read it"
            )
        self.head = head
        self.head_name = head_name
        self.tied_mode = tied
        embedding = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
        self.is_tied = embedding is not None and getattr(embedding, "weight", None) is head.weight
        self._lookups: list[_LookupGradient] = []
        self._hook_handles: list = []
        self._closed = False
        if self.is_tied and tied == "output":
            self._embedding_scale = self._check_embedding(embedding)
            self._hook_handles.append(embedding.register_forward_hook(self._on_embedding_forward, with_kwargs=True))
        self.embedding = embedding

    # --- hooks: record G_lookup, one compact (ids, rows) per embedding call that is backpropagated ---

    @staticmethod
    def _check_embedding(embedding: nn.Module):
        """The factor between the embedding module's output and the raw lookup (Gemma scales it), or fail."""
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(
                f"tied='output' needs the input embedding to be an nn.Embedding (got {type(embedding).__name__}); "
                "use tied='total'"
            )
        if embedding.sparse:
            raise ValueError("tied='output' does not support nn.Embedding(sparse=True); use tied='total'")
        if type(embedding).forward is nn.Embedding.forward:
            return None
        scale = getattr(embedding, "embed_scale", None)  # Gemma: forward returns lookup * embed_scale
        if scale is None:
            raise ValueError(
                f"tied='output' cannot see the lookup gradient inside {type(embedding).__name__}.forward "
                "(it overrides nn.Embedding.forward without an embed_scale); use tied='total'"
            )
        return scale

    def _on_embedding_forward(self, module: nn.Embedding, args, kwargs, output):
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return  # generation / no_grad scoring: no gradient will come back
        token_ids = args[0] if args else kwargs["input"]
        output.register_hook(lambda grad: self._on_embedding_grad(module, token_ids, grad))

    def _on_embedding_grad(self, module: nn.Embedding, token_ids: torch.Tensor, grad: torch.Tensor) -> None:
        # nn.Embedding's backward: row v of W.grad += Σ_{i: id_i = v} grad_i (÷ count of v if
        # scale_grad_by_freq), and the padding_idx row gets nothing.
        flat_ids = token_ids.reshape(-1).to(torch.int64)
        rows = grad.reshape(flat_ids.numel(), -1).float()  # (N, hidden)
        if self._embedding_scale is not None:
            rows = rows * self._embedding_scale
        lookup = _compact(flat_ids, rows)
        if module.scale_grad_by_freq:
            counts = torch.bincount(flat_ids, minlength=1).index_select(0, lookup.token_ids)
            lookup.rows.div_(counts.unsqueeze(1).float())
        if module.padding_idx is not None:
            keep = lookup.token_ids != module.padding_idx
            lookup = _LookupGradient(lookup.token_ids[keep], lookup.rows[keep])
        self._lookups.append(lookup)

    # --- reading ---

    def energy(self) -> torch.Tensor:
        """g_t = ‖G_lm‖²_F as a 0-dim float32 tensor on the gradient's device (see the module docstring).

        Raises RuntimeError if the head has no gradient (backward has not run since the last ``zero_grad``).
        Under torch.distributed this is a collective for tied ``"output"`` and for sharded gradients: call it
        on every rank.
        """
        weight_grad = self.head.weight.grad
        if weight_grad is None:
            raise RuntimeError(
                f"the lm_head ({self.head_name!r}) has no gradient: backward() has not run since the gradients "
                "were reset (zero_grad(set_to_none=True)), or the framework frees .grad after reducing it "
                "(DeepSpeed ZeRO-2/3), which LMHeadGradProbe does not support"
            )
        if weight_grad.is_sparse:
            raise RuntimeError(f"the lm_head ({self.head_name!r}) gradient is sparse; LMHeadGradProbe needs dense")
        if self.is_tied and self.tied_mode == "output":
            if self._closed:
                raise RuntimeError("LMHeadGradProbe was closed: its hooks are gone, so tied='output' cannot be read")
            energy = self._tied_output_energy(weight_grad)
        elif _is_dtensor(weight_grad):
            energy = _dtensor_squared_norm(weight_grad)
        else:
            energy = _squared_norm(weight_grad)
        bias = getattr(self.head, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.grad is not None:
            energy = energy + (_dtensor_squared_norm(bias.grad) if _is_dtensor(bias.grad) else _squared_norm(bias.grad))
        return energy

    def _tied_output_energy(self, weight_grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        local_lookup = _merge(self._lookups) if self._lookups else None
        hidden = weight_grad.shape[1]
        if _is_dtensor(weight_grad):
            return self._sharded_tied_output_energy(weight_grad, local_lookup)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(self._ddp_group) > 1
        if not distributed:
            return _energy_without_lookup(weight_grad, local_lookup)
        empty = _LookupGradient(torch.zeros(0, dtype=torch.int64, device=weight_grad.device),
                                torch.zeros(0, hidden, dtype=torch.float32, device=weight_grad.device))
        lookup = _all_gather_lookup(local_lookup or empty, hidden, weight_grad.device, self._ddp_group)
        energy = _energy_without_lookup(weight_grad, lookup)
        # Every rank computed the same number; averaging makes it bit-identical where kernels are not.
        dist.all_reduce(energy, group=self._ddp_group)
        return energy / dist.get_world_size(self._ddp_group)

    def _sharded_tied_output_energy(self, weight_grad, local_lookup: _LookupGradient | None) -> torch.Tensor:
        import torch.distributed as dist
        from torch.distributed.tensor import Shard

        mesh = weight_grad.device_mesh
        if mesh.ndim != 1 or weight_grad.placements != (Shard(0),):
            raise RuntimeError(
                f"tied='output' supports a sharded lm_head gradient only on a 1-D mesh with Shard(0) "
                f"(got placements {weight_grad.placements} on a {mesh.ndim}-D mesh); use tied='total'"
            )
        group = mesh.get_group()
        local_grad = weight_grad.to_local()  # rows [offset, offset + local_rows) of the full gradient
        vocab, hidden = weight_grad.shape
        rows_per_rank = -(-vocab // dist.get_world_size(group))  # torch.chunk's split, as Shard(0) uses
        offset = min(rows_per_rank * dist.get_rank(group), vocab)
        device = local_grad.device
        empty = _LookupGradient(torch.zeros(0, dtype=torch.int64, device=device),
                                torch.zeros(0, hidden, dtype=torch.float32, device=device))
        lookup = _all_gather_lookup(local_lookup or empty, hidden, device, group)
        mine = (lookup.token_ids >= offset) & (lookup.token_ids < offset + local_grad.shape[0])
        local_lookup_rows = _LookupGradient(lookup.token_ids[mine] - offset, lookup.rows[mine])
        energy = _energy_without_lookup(local_grad, local_lookup_rows)
        dist.all_reduce(energy, group=group)
        return energy

    # --- lifecycle ---

    def reset(self) -> None:
        """Forget the recorded lookup gradients; call after every optimizer step or discarded update."""
        self._lookups.clear()

    def close(self) -> None:
        """Remove the hooks; reading a tied ``"output"`` energy afterwards raises."""
        self._closed = True
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        self._lookups.clear()

    def __enter__(self) -> LMHeadGradProbe:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"LMHeadGradProbe(head={self.head_name!r}, tied={self.is_tied}, mode={self.tied_mode!r}, "
                f"pending_lookups={len(self._lookups)})")


def global_grad_norm(optimizer) -> float:
    """‖∇‖ over every parameter the optimizer holds, before clipping (what the gradnorm rule and logs read)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
