"""Where and on what a run ran: one JSON line in ``environment.jsonl`` each time ``train()`` starts or resumes.

Timings and even samples depend on the machine (bf16 kernels differ between AMX and avx512_bf16 CPUs, so the
same seed does not draw the same completions), and a resumed run may continue on another machine. Each line
gives the batches done before that start, the CPU model and the flags that decide bf16, the cores and threads,
the device, the resolved precision, and the versions of Python, torch, transformers and dgg (with the git
commit of a source checkout, and whether it had uncommitted changes)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

ENVIRONMENT_FILE = "environment.jsonl"
# Flags that decide how fast (and whether natively) a CPU multiplies in bf16 and fp32.
MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def read_cpuinfo() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return handle.read()
    except OSError:  # not Linux
        return None


def cpu_flags(cpuinfo: str | None) -> set[str]:
    """The flags of /proc/cpuinfo's first ``flags`` line (all cores of a VM report the same); empty if none."""
    for line in (cpuinfo or "").splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_model(cpuinfo: str | None) -> str:
    """The ``model name`` of /proc/cpuinfo, else what the platform module says, else ``unknown``."""
    for line in (cpuinfo or "").splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def machine_threads() -> int:
    """CPU cores this process may run on (its affinity mask), the default for torch's intra-op threads."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def source_commit(path: Path) -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes) of the git checkout holding ``path``; (None, None) outside one."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit.strip(), None if status is None else bool(status.strip())


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe_environment(device: torch.device, precision: str, cpuinfo: str | None = None) -> dict:
    """The machine and software this process trains on (``precision`` as resolved, never ``auto``)."""
    from dgg import __version__

    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    commit, dirty = source_commit(Path(__file__).resolve().parent)
    flags = cpu_flags(cpuinfo)
    return {
        "cpu": cpu_model(cpuinfo),
        "cpu_flags": [flag for flag in MATMUL_FLAGS if flag in flags],
        "cores": machine_threads(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": precision,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "dgg": __version__,
        "dgg_commit": commit,
        "dgg_uncommitted_changes": dirty,
    }


def record_start(run_dir: Path, batches_done: int, environment: dict) -> None:
    """Append this start's line, ``batches_done`` being the batches the run had completed before it (flushed to
    disk, so that a crash right after still leaves it)."""
    line = {"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "batches_done": batches_done,
            **environment}
    with open(Path(run_dir) / ENVIRONMENT_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_environment(run_dir: Path) -> list[dict]:
    """Every start of the run in order; [] for a run from before this file existed. ``run_dir`` may also be such
    a file itself (a harvested copy, ``NAME.environment.jsonl``)."""
    path = Path(run_dir) if str(run_dir).endswith(".jsonl") else Path(run_dir) / ENVIRONMENT_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def machine_label(line: dict) -> str:
    """What decides a run's speed and samples, in a few words: the processor (and its bf16 flags) or the GPU,
    the precision and the threads."""
    where = line.get("gpu") or line.get("cpu", "unknown")
    flags = [flag for flag in line.get("cpu_flags", []) if "bf16" in flag]
    if flags and not line.get("gpu"):
        where += f" ({', '.join(flags)})"
    threads = line.get("threads")
    return f"{where}, {line.get('precision', '?')}" + (f", {threads} thread{'s' * (threads != 1)}" if threads else "")
