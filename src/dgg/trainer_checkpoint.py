"""Checkpoints of the reference trainer: when one is due, what it holds (with the rollout batch a stop signal
interrupted, and where its reuse stood), and how a resumed run continues from it. Each is written to a temporary
directory, then renamed, so the last good one survives a crash (``dgg.run_io``)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from dgg.preemption import RunStopped
from dgg.rollout import RolloutBatch
from dgg.run_io import (
    CHECKPOINT,
    RunState,
    read_trainer_state,
    restore_rng_states,
    rng_states,
    truncate_to,
    write_checkpoint,
)


class Checkpointing:
    """Mixed into :class:`dgg.trainer.GRPOTrainer`, whose state it saves and restores."""

    def save_checkpoint(self, pending: dict | None = None) -> Path:
        """``pending``: the batch a stop signal interrupted and where its reuse stands (None between batches)."""
        self._tick()
        final = write_checkpoint(self.run_dir, self.model, self.tokenizer, {
            "state": asdict(self.state),
            "optimizer": self.optimizer.state_dict(),
            "gate": self.gate.state_dict(),
            **self.controller.state_dict(),  # "reuse_rule" and "watch"
            "profiler": self.profiler.state_dict() if self.profiler else None,
            "sampled_ids": self._sampled_ids,
            "rng": rng_states(),
            "metrics_offset": self.metrics.offset(),
            "reward_errors_offset": self._reward_errors_path.stat().st_size if self._reward_errors_path.exists()
            else 0,
            "pending": pending,
        })
        self._last_checkpoint_time, self._last_checkpoint_batch = time.monotonic(), self.state.batch
        self._clock = time.perf_counter()
        return final

    def _load_checkpoint(self, directory: Path, metrics_path: Path) -> None:
        saved = read_trainer_state(directory, self.device)
        self.state = RunState(**saved["state"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if "reuse_rule" in saved:
            self.controller.load_state_dict({"reuse_rule": saved["reuse_rule"], "watch": saved["watch"]})
        else:  # a checkpoint from before reuse rules: the gate was the only state
            self.gate.load_state_dict(saved["gate"])
        if self.profiler and saved["profiler"] is not None:
            self.profiler.load_state_dict(saved["profiler"])
            self._sampled_ids = [ids.cpu() for ids in saved.get("sampled_ids", [])]
        restore_rng_states(saved["rng"])
        # Lines written after the checkpoint belong to work that is being redone (a torn last line included).
        truncate_to(metrics_path, saved["metrics_offset"])
        truncate_to(self._reward_errors_path, saved.get("reward_errors_offset"))
        self._last_checkpoint_batch = self.state.batch
        if (pending := saved.get("pending")) is not None:  # stopped inside a batch: it goes on from there
            self._pending = (RolloutBatch.from_state(pending["batch"]),
                             (int(pending["reuse_index"]), int(pending["mini_batch"])))
            self._last_checkpoint_batch = -1  # that batch's end still needs its own checkpoint

    def _checkpoint_due(self) -> bool:
        every, minutes = self.config.train.checkpoint_every, self.config.train.checkpoint_minutes
        by_count = bool(every) and self.state.batch % every == 0
        by_time = bool(minutes) and time.monotonic() - self._last_checkpoint_time >= 60 * minutes
        return by_count or by_time

    def _stop_if_requested(self, batch: RolloutBatch | None = None, position: tuple[int, int] = (1, 0)) -> None:
        """After a stop signal: checkpoint here, between two update attempts (with the batch in progress and
        where its reuse stands) or between two batches, and raise :class:`RunStopped`."""
        if not self.stop.requested:
            return
        pending = None
        if batch is not None:
            if (saved := batch.to_state()) is None:  # cannot be saved: finish the batch, stop after it
                return
            pending = {"batch": saved, "reuse_index": position[0], "mini_batch": position[1]}
        if pending is not None or self._last_checkpoint_batch != self.state.batch:
            self.save_checkpoint(pending)
        where = f"inside batch {self.state.batch}, after update {self.state.updates}" if pending \
            else f"after batch {self.state.batch}"
        raise RunStopped(self.stop.signum, self.run_dir,
                         f"stopped by {self.stop.name} {where}; checkpoint saved in {self.run_dir / CHECKPOINT}")
