"""Running named arms over seeds, resumably, and turning their metrics into summaries and a report.

Shared by ``dgg demo`` and ``dgg bench``: each run lives in ``OUT/<arm>/seed<k>/`` and is skipped when its
``done.json`` exists, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from dgg.analysis import ArmSummary, compare_to_baseline, mean_and_std, read_metrics, summary_dict
from dgg.config import load_config

log = logging.getLogger("dgg.experiments")
DONE = "done.json"


@dataclass(frozen=True)
class Arm:
    """One configuration of an experiment: a name, a label for figures, and its config overrides."""

    name: str
    label: str
    overrides: tuple[str, ...]


def reuse_arms(max_reuse: int, tau: float) -> list[Arm]:
    """The paper's three methods (§6.2): single-use, naive reuse (fixed K) and DGG (up to K, gated)."""
    return [
        Arm("single", "GRPO (single-use)", ("reuse.mode=single",)),
        Arm("naive", f"GRPO w/ Naive Reuse (K={max_reuse})", ("reuse.mode=fixed", f"reuse.max_reuse={max_reuse}")),
        Arm("dgg", f"GRPO w/ DGG (K={max_reuse}, τ={tau:g})",
            ("reuse.mode=dgg", f"reuse.max_reuse={max_reuse}", f"reuse.tau={tau}")),
    ]


def run_dir_for(out: Path, arm: Arm, seed: int) -> Path:
    return out / arm.name / f"seed{seed}"


def run_arm(config: str | Path | None, overrides: list[str], arm: Arm, seed: int, out: Path,
            force: bool = False) -> Path:
    """Train one arm for one seed unless it already finished; returns its run directory."""
    from dgg.trainer import train

    run_dir = run_dir_for(out, arm, seed)
    if (run_dir / DONE).is_file() and not force:
        log.info("%s seed %d: already finished, skipped (%s)", arm.name, seed, run_dir)
        return run_dir
    resolved = load_config(config, [*overrides, *arm.overrides, f"train.seed={seed}", f"output.dir={run_dir}"])
    trainer = train(resolved)
    (run_dir / DONE).write_text(json.dumps({"arm": arm.name, "seed": seed, "batches": trainer.state.batch,
                                            "rollouts": trainer.state.rollouts,
                                            "wall_time": trainer.state.wall_time}))
    return run_dir


def summarise(out: Path, arms: list[Arm], seeds: list[int], baseline: str = "single"
              ) -> tuple[dict[str, list[ArmSummary]], dict[str, list[list[dict]]]]:
    """Per arm: one summary per seed (speedups against the same seed's baseline) and the metrics records."""
    summaries: dict[str, list[ArmSummary]] = {a.name: [] for a in arms}
    records: dict[str, list[list[dict]]] = {a.name: [] for a in arms}
    for seed in seeds:
        per_arm = {a.name: read_metrics(run_dir_for(out, a, seed)) for a in arms}
        for name, summary in compare_to_baseline(per_arm, baseline).items():
            summary.seed = seed
            summaries[name].append(summary)
            records[name].append(per_arm[name])
    return summaries, records


def aggregate(summaries: dict[str, list[ArmSummary]]) -> dict[str, dict]:
    """Mean ± std over seeds of each headline number, per arm."""
    keys = ("converged_accuracy", "peak_accuracy", "final_accuracy", "rollout_speedup", "wall_clock_speedup",
            "wall_time", "discards", "mean_reuse_per_batch")
    out = {}
    for arm, runs in summaries.items():
        entry = {}
        for key in keys:
            mean, std, missing = mean_and_std([getattr(s, key) for s in runs])
            entry[key] = {"mean": mean, "std": std, "missing": missing}
        entry["collapsed_seeds"] = sum(s.collapsed for s in runs)
        entry["seeds"] = [s.seed for s in runs]
        entry["runs"] = [summary_dict(s) for s in runs]
        out[arm] = entry
    return out
