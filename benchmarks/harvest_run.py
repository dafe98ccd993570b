"""Copy a finished sweep run's logs into benchmarks/results/, check the copy, and free its checkpoint.

    python benchmarks/harvest_run.py RUN_DIR benchmarks/results/SWEEP/NAME_lrLR_seedN [--delete-checkpoint]

Writes ``NAME_lrLR_seedN.metrics.jsonl`` and, where the run recorded it, ``NAME_lrLR_seedN.environment.jsonl``
(the machine of each start or resume; ``dgg.run_environment``). A run counts as finished when its log has the
update and the evaluation of its last batch (``train.max_batches`` in its ``config.yaml``); anything else is
refused, as is a destination that already holds different bytes. With ``--delete-checkpoint`` the run's
checkpoint folders go only after both copies compare equal to their sources (DEVELOPERS.md, "Long experiments").
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from pathlib import Path

from dgg.analysis import read_metrics
from dgg.config import load_config
from dgg.errors import UserError

CHECKPOINT_FOLDERS = ("checkpoint", "checkpoint.old", "checkpoint.tmp")


class HarvestError(Exception):
    pass


def last_batch_finished(run_dir: Path) -> int:
    """The run's ``train.max_batches`` once its log holds that batch's update and evaluation; else HarvestError."""
    try:
        records = read_metrics(run_dir)
        wanted = load_config(run_dir / "config.yaml").train.max_batches
    except (FileNotFoundError, UserError) as err:
        raise HarvestError(str(err)) from None
    kinds = {record.get("kind") for record in records if record.get("batch") == wanted}
    if not {"update", "eval"} <= kinds:
        raise HarvestError(f"{run_dir} has not finished: no update and evaluation of batch {wanted} "
                           "(train.max_batches) in its metrics.jsonl")
    return wanted


def harvest(run_dir: Path, destination: Path, delete_checkpoint: bool) -> list[Path]:
    last_batch_finished(run_dir)
    copies = [(run_dir / "metrics.jsonl", destination.with_name(destination.name + ".metrics.jsonl"))]
    if (run_dir / "environment.jsonl").is_file():
        copies.append((run_dir / "environment.jsonl", destination.with_name(destination.name + ".environment.jsonl")))
    for source, target in copies:
        if target.exists() and not filecmp.cmp(source, target, shallow=False):
            raise HarvestError(f"{target} already exists with other contents; remove it or choose another name")
    destination.parent.mkdir(parents=True, exist_ok=True)
    for source, target in copies:
        shutil.copyfile(source, target)
        if not filecmp.cmp(source, target, shallow=False):
            raise HarvestError(f"{target} differs from {source} after copying; nothing was deleted")
    if delete_checkpoint:
        for name in CHECKPOINT_FOLDERS:
            if (run_dir / name).is_dir():
                shutil.rmtree(run_dir / name)
    return [target for _, target in copies]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run directory (holds config.yaml, metrics.jsonl)")
    parser.add_argument("destination", type=Path,
                        help="results path without suffix, e.g. benchmarks/results/SWEEP/naive_lr1.5e-5_seed0")
    parser.add_argument("--delete-checkpoint", action="store_true",
                        help="delete the run's checkpoint once the copies are verified")
    args = parser.parse_args(argv)
    try:
        written = harvest(args.run_dir, args.destination, args.delete_checkpoint)
    except HarvestError as err:
        print(f"harvest_run: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
