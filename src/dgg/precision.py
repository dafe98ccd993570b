"""Numeric precision of forward passes: fp32, or bf16 autocast over fp32 master weights.

Under ``bf16`` the matrix multiplications of forward and backward run in bfloat16 (AMX / avx512_bf16 on
recent x86 CPUs, tensor cores on GPUs) while the parameters, their gradients, AdamW's state, the loss
reductions (log-softmax, ratios, means) and the gate's energy stay in float32: logits are cast to float32
before anything is reduced over them, and ``.grad`` of a float32 parameter is float32.
"""

from __future__ import annotations

import contextlib

import torch

from dgg.run_environment import cpu_flags, read_cpuinfo

PRECISIONS = ("fp32", "bf16", "auto")  # auto: bf16 where the hardware multiplies it, else fp32


def autocast(device: torch.device, precision: str):
    """The context that forward passes run under for ``precision``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be one of {PRECISIONS} (got {precision!r})")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this x86 CPU multiplies bf16 in hardware (avx512_bf16 or AMX); None where /proc/cpuinfo is not
    there to say. Without it, oneDNN emulates bf16: on an avx512 Xeon without avx512_bf16, SmolLM2-135M's
    sampling took 1.95x as long under bf16 autocast as in fp32, and a K = 4 trainer batch 1.19x (BENCHMARKS.md)."""
    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = cpu_flags(cpuinfo)
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def bf16_warning(device: torch.device, precision: str, cpuinfo: str | None = None) -> str | None:
    """What to tell a user who asked for bf16 on a CPU that only emulates it."""
    if precision != "bf16" or device.type != "cpu" or cpu_has_native_bf16(cpuinfo) is not False:
        return None
    return ("train.precision=bf16 on a CPU without avx512_bf16 or AMX: bf16 is emulated there and runs slower than "
            "fp32 (sampling about 2x); set train.precision=fp32 (or auto) on this machine")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` becomes bf16 on a GPU that supports it or a CPU with avx512_bf16/AMX, and fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
