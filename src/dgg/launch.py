"""Start a run, or continue one from its last checkpoint: the entry that ``dgg train`` calls."""

from __future__ import annotations

import logging
from pathlib import Path

from dgg.config import Config
from dgg.run_io import find_checkpoint
from dgg.run_lock import lock_or_refuse, unlock
from dgg.trainer import GRPOTrainer

log = logging.getLogger("dgg.launch")


def train(config: Config, resume: str | Path | None = None) -> GRPOTrainer:
    """Build a trainer (fresh or resumed) and run it; returns the finished trainer."""
    resume_from = None
    run_dir = Path(resume) if resume is not None else Path(config.output.dir)
    lock_or_refuse(run_dir)  # before find_checkpoint, which may repair the directory
    try:
        if resume is not None:
            resume_from = find_checkpoint(run_dir)
            if resume_from is None:  # nothing was saved, so nothing is lost: start it again, from a clean directory
                log.warning("--resume %s: the run stopped before its first checkpoint; starting it again from "
                            "batch 0", resume)
                config.output.overwrite = True
        trainer = GRPOTrainer(config, resume_from=resume_from)
        trainer.train()
    finally:
        unlock(run_dir)
    return trainer


