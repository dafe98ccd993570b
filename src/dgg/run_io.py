"""A run directory: its counters (``RunState``), its metrics file, its checkpoints (written to a temporary folder,
then renamed, so the last good one survives a crash; loaded without pickle's code paths) and what ``--resume``
may change."""

from __future__ import annotations

import errno
import json
import logging
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dgg.config import Config, ConfigError, flatten, load_config, to_dict

log = logging.getLogger("dgg.run_io")

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.pt"


@dataclass
class RunState:
    """Counters that define where a run is; saved in every checkpoint."""

    batch: int = 0  # rollout batches completed
    data_position: int = 0  # next training-problem index
    rollouts: int = 0  # cumulative sampled completions (training only)
    wall_time: float = 0.0  # training seconds, evaluation and checkpointing excluded
    updates: int = 0  # optimizer steps applied
    attempts: int = 0  # update attempts (applied + discarded + skipped)
    nonfinite_skips: int = 0
    reward_errors: int = 0
    failed_reward_batches: int = 0  # consecutive batches on which every reward failed
    bound_violations: int = 0  # updates whose lm_head energy exceeded Theorem 2's bound


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl; every line carries kind, batch, rollouts, wall_time."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ConfigError("output.tensorboard needs TensorBoard: pip install dgg[tensorboard]") from err
            self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, kind: str, state: RunState, values: dict[str, Any]) -> None:
        record = {"kind": kind, "batch": state.batch, "rollouts": state.rollouts,
                  "wall_time": round(state.wall_time, 6), **values}
        if self._file.closed:  # the trainer is used again after train() returned
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record, default=_json_default) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = state.updates if kind == "update" else state.rollouts
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "/" in key:
                    self._tb.add_scalar(key, value, step)

    def offset(self) -> int:
        self._file.flush()
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_checkpoint(run_dir: Path, model, tokenizer, state: dict) -> Path:
    """Weights (safetensors), tokenizer and trainer state into ``checkpoint.tmp``, then renamed over the old one.

    A write that fails (a full disk: torch and safetensors report it as their own errors) removes the partial
    ``checkpoint.tmp`` and raises an OSError that says so, names the disk's free space and leaves the previous
    checkpoint as it was, for ``--resume`` once there is room."""
    final = run_dir / CHECKPOINT
    tmp, old = final.with_name(CHECKPOINT + ".tmp"), final.with_name(CHECKPOINT + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
    except Exception as err:  # noqa: BLE001 - every writer's failure becomes the one message below
        shutil.rmtree(tmp, ignore_errors=True)
        raise checkpoint_write_error(final, err) from err
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_write_error(final: Path, cause: BaseException) -> OSError:
    free = shutil.disk_usage(final.parent).free / 1e9
    full = (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) or "No space left" in str(cause) \
        or free < 1.0
    kept = f"the previous checkpoint in {final} is intact" if final.exists() else "no earlier checkpoint exists"
    what = "the disk is full" if full else f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    return OSError(errno.ENOSPC if full else errno.EIO,
                   f"could not write a checkpoint ({what}; {free:.1f} GB free there); the partial one was removed "
                   f"and {kept}; make room and resume the run in {final.parent}")


def read_trainer_state(directory: Path, device) -> dict:
    try:  # tensors, numbers, strings and containers only: a crafted state file cannot run code here
        return torch.load(directory / STATE_FILE, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ConfigError(f"{directory / STATE_FILE} is not a dgg trainer state that can be loaded safely "
                          f"({type(err).__name__}: {str(err).splitlines()[0]})") from None


def truncate_to(path: Path, offset: int | None) -> None:
    """Cut a log back to a checkpoint's offset: lines after it belong to work being redone (a torn one too)."""
    if offset is not None and path.exists():
        with open(path, "r+b") as f:
            f.truncate(offset)


RUN_FILES = ("metrics.jsonl", "config.yaml", CHECKPOINT, CHECKPOINT + ".old", CHECKPOINT + ".tmp",
             "reward_errors.jsonl", "tensorboard", "done.json", "environment.jsonl")


def prepare_fresh_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to start a fresh run where one already lives, unless asked to replace it (then clear it)."""
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not existing:
        return
    if not overwrite:
        raise ConfigError(f"output.dir {run_dir} already holds a run ({', '.join(existing)}); continue it with "
                          f"--resume {run_dir}, replace it with --overwrite (output.overwrite=true), or choose "
                          "another --output")
    for name in existing:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def find_checkpoint(run_dir: Path) -> Path | None:
    """The run directory if it holds a checkpoint; None if the run died before its first one (config.yaml only);
    else a clear error."""
    if (run_dir / CHECKPOINT / STATE_FILE).is_file():
        return run_dir
    if (run_dir / (CHECKPOINT + ".old") / STATE_FILE).is_file():  # crashed between the two renames
        (run_dir / (CHECKPOINT + ".old")).rename(run_dir / CHECKPOINT)
        return run_dir
    if (run_dir / "config.yaml").is_file():
        return None
    raise ConfigError(f"--resume {run_dir}: no checkpoint found (expected {run_dir / CHECKPOINT / STATE_FILE})")


# What an override may change when a run is resumed: how long it runs and how it reports, never what it computes.
RESUMABLE_KEYS = ("train.max_batches", "train.threads", "train.checkpoint_every", "train.checkpoint_minutes",
                  "output.progress", "output.tensorboard", "output.dir", "output.overwrite")


def load_run_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The resolved config a run was started with (for --resume), plus overrides of :data:`RESUMABLE_KEYS`;
    any other change is refused with the difference, since it would splice two different runs together."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml in that directory")
    stored = flatten(to_dict(load_config(path)))
    config = load_config(path, overrides)
    changed = {key: (stored.get(key), value) for key, value in flatten(to_dict(config)).items()
               if stored.get(key) != value and key not in RESUMABLE_KEYS}
    if changed:
        diff = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise ConfigError(f"--resume {run_dir}: these settings differ from the run's config.yaml and cannot change "
                          f"mid-run: {diff}. Only {', '.join(RESUMABLE_KEYS)} may; start a new run for the rest")
    config.output.dir = str(run_dir)
    return config


def rng_states() -> dict:
    """Every RNG a run draws from (torch, Python, CUDA), as a checkpoint keeps them."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_states(saved: dict) -> None:
    torch.set_rng_state(saved["torch"].cpu())
    random.setstate(saved["python"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
