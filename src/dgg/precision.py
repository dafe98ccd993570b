"""Numeric precision of forward passes: fp32, or bf16 autocast over fp32 master weights.

Under ``bf16`` the matrix multiplications of forward and backward run in bfloat16 (AMX / avx512_bf16 on
recent x86 CPUs, tensor cores on GPUs) while the parameters, their gradients, AdamW's state, the loss
reductions (log-softmax, ratios, means) and the gate's energy stay in float32: logits are cast to float32
before anything is reduced over them, and ``.grad`` of a float32 parameter is float32.
"""

from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device, precision: str):
    """The context that forward passes run under for ``precision``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be one of {PRECISIONS} (got {precision!r})")


def machine_threads() -> int:
    """CPU cores this process may run on (its affinity mask), the default for torch's intra-op threads."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
