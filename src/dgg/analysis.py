"""Analysis of runs from their metrics files alone: converged accuracy, speedups (paper Table 1), collapse.

Definitions (paper §6.2, Table 1 and its footnotes 5–6):
- converged accuracy: the mean of the last five evaluations;
- cost to reach a target: the rollouts (or training wall-clock seconds) at the first evaluation whose accuracy
  is at least the target;
- speedup of an arm over the single-use baseline: baseline cost / arm cost, both to reach the *baseline's*
  converged accuracy; relative reduction = 1 − arm cost / baseline cost; None when the arm never reaches it.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dgg.errors import UserError, utf8_lines

CONVERGED_WINDOW = 5
BASELINE_ARM = "single"  # every arm's speedups are against the single-use run of the same seed
COLLAPSE_THRESHOLD = 0.10  # absolute accuracy lost from the peak to the converged value
RECOVERED_WITHIN = COLLAPSE_THRESHOLD / 2  # a run whose last evaluation is this close to its peak did not collapse
COLLAPSE_RULE = (f"A run counts as collapsed when its peak accuracy exceeds its converged accuracy by more than "
                 f"{COLLAPSE_THRESHOLD:.2f} and its last evaluation by more than {RECOVERED_WITHIN:.2f}.")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl; ``run_dir`` may also be such a file itself (a collected log such as
    benchmarks/results/agents/*.metrics.jsonl)."""
    path = Path(run_dir) if str(run_dir).endswith(".jsonl") else Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a dgg run directory or its metrics file?")
    records = []
    for number, line in utf8_lines(path):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if not line.endswith("\n"):  # a line torn by a kill mid-write: everything before it is whole
                break
            raise UserError(f"{path}, line {number}: not JSON ({err})") from None
    return records


@dataclass(frozen=True)
class EvalPoint:
    batch: int
    rollouts: int
    wall_time: float
    accuracy: float


def eval_points(records: list[dict]) -> list[EvalPoint]:
    return [EvalPoint(r["batch"], r["rollouts"], r["wall_time"], r["eval/accuracy"])
            for r in records if r["kind"] == "eval"]


def converged_accuracy(points: list[EvalPoint], window: int = CONVERGED_WINDOW) -> float | None:
    """Mean accuracy of the last ``window`` evaluations (the paper's converged performance)."""
    if not points:
        return None
    return statistics.fmean(p.accuracy for p in points[-window:])


def cost_to_reach(points: list[EvalPoint], target: float, axis: str = "rollouts") -> float | None:
    """Rollouts or wall-clock seconds at the first evaluation reaching ``target`` (None if never)."""
    for point in points:
        if point.accuracy >= target - 1e-12:
            return float(getattr(point, axis))
    return None


def speedup(baseline_cost: float | None, arm_cost: float | None) -> float | None:
    """Footnote 6: baseline cost / arm cost; None when the arm never reaches the target."""
    if baseline_cost is None or arm_cost is None:
        return None
    if arm_cost == 0:
        return math.inf if baseline_cost > 0 else 1.0
    return baseline_cost / arm_cost


def degradation_onset(points: list[EvalPoint]) -> EvalPoint | None:
    """The peak evaluation of a run that then collapsed, else None.

    Collapsed: the peak exceeds the converged accuracy by more than COLLAPSE_THRESHOLD, and the last evaluation
    is not back within RECOVERED_WITHIN of the peak. The second condition keeps a short run that is still climbing
    (its last five evaluations reach back to its first batches, so their mean sits far below its final peak)
    from counting as collapsed.
    """
    if not points:
        return None
    peak = max(points, key=lambda p: p.accuracy)
    converged = converged_accuracy(points)
    dropped = (peak.accuracy - converged > COLLAPSE_THRESHOLD
               and peak.accuracy - points[-1].accuracy > RECOVERED_WITHIN)
    return peak if dropped else None


@dataclass
class ArmSummary:
    """One run's numbers, as written to summary.json."""

    arm: str
    seed: int | None
    converged_accuracy: float | None
    peak_accuracy: float | None
    final_accuracy: float | None
    initial_accuracy: float | None
    rollouts: int
    wall_time: float
    updates: int
    discards: int
    collapsed: bool
    onset_rollouts: int | None
    mean_reuse_per_batch: float | None
    discards_by_reuse_index: dict[str, int] = field(default_factory=dict)
    stops_by_reason: dict[str, int] = field(default_factory=dict)  # every reuse rule's drops, by its reason
    rollout_speedup: float | None = None
    wall_clock_speedup: float | None = None
    rollouts_to_target: float | None = None
    wall_time_to_target: float | None = None
    target_accuracy: float | None = None  # the baseline's converged accuracy that speedups are measured to
    speedup_undefined: bool = False  # the baseline was at its converged accuracy before training


def summarise_run(records: list[dict], arm: str, seed: int | None = None) -> ArmSummary:
    points = eval_points(records)
    updates = [r for r in records if r["kind"] == "update"]
    rollout_records = [r for r in records if r["kind"] == "rollout"]
    discards: dict[str, int] = {}
    for r in updates:
        if r.get("gate/discard") and r.get("gate/reason") == "zscore":
            key = str(r["reuse_index"])
            discards[key] = discards.get(key, 0) + 1
    stops: dict[str, int] = {}
    for r in updates:
        if r.get("reuse/stop"):
            stops[r["reuse/stop_reason"]] = stops.get(r["reuse/stop_reason"], 0) + 1
    onset = degradation_onset(points)
    last = records[-1] if records else {"rollouts": 0, "wall_time": 0.0}
    return ArmSummary(
        arm=arm, seed=seed,
        converged_accuracy=converged_accuracy(points),
        peak_accuracy=max((p.accuracy for p in points), default=None),
        final_accuracy=points[-1].accuracy if points else None,
        initial_accuracy=points[0].accuracy if points else None,
        rollouts=int(last["rollouts"]), wall_time=float(last["wall_time"]),
        updates=sum(1 for r in updates if r.get("actor/applied")),
        discards=sum(discards.values()),
        collapsed=onset is not None,
        onset_rollouts=onset.rollouts if onset else None,
        mean_reuse_per_batch=(statistics.fmean(r["gate/reuse_count"] for r in rollout_records)
                              if rollout_records else None),
        discards_by_reuse_index=discards,
        stops_by_reason=stops,
    )


def compare_to_baseline(arms: dict[str, list[dict]], baseline: str = BASELINE_ARM) -> dict[str, ArmSummary]:
    """Summaries of every arm, with Table-1 speedups against ``baseline``'s converged accuracy."""
    summaries = {name: summarise_run(records, name) for name, records in arms.items()}
    if baseline not in arms:
        return summaries
    base_points = eval_points(arms[baseline])
    target = converged_accuracy(base_points)
    if target is None:
        return summaries
    base_rollouts = cost_to_reach(base_points, target, "rollouts")
    base_time = cost_to_reach(base_points, target, "wall_time")
    for s in summaries.values():
        s.target_accuracy = target
    if not base_rollouts:  # the baseline was already there before training: no speedup is defined
        for s in summaries.values():
            s.speedup_undefined = True
        return summaries
    for name, records in arms.items():
        points = eval_points(records)
        s = summaries[name]
        s.rollouts_to_target = cost_to_reach(points, target, "rollouts")
        s.wall_time_to_target = cost_to_reach(points, target, "wall_time")
        s.rollout_speedup = speedup(base_rollouts, s.rollouts_to_target)
        s.wall_clock_speedup = speedup(base_time, s.wall_time_to_target)
    return summaries


def mean_and_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample std over the values that exist, and how many did not (e.g. a target never reached)."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    missing = len(values) - len(present)
    if not present:
        return None, None, missing
    return statistics.fmean(present), (statistics.stdev(present) if len(present) > 1 else 0.0), missing


def summary_dict(summary: ArmSummary) -> dict:
    return asdict(summary)


def format_speedup(value: float | None) -> str:
    if value is None:
        return "never reached"
    return f"{value:.2f}× ({(1 - 1 / value) * 100:.1f}%)" if value > 0 else "—"


SIGNAL_KEYS = ("actor/kl", "actor/clip_ratio", "actor/grad_norm", "actor/lm_head_grad_energy")


def signal_firings(records: list[dict], key: str, tau: float, window: int = 20, history: str = "all") -> list[int]:
    """Rollout counts at which the paper's z-score rule (Eq. 8, k > 1), applied to signal ``key``, would fire.

    Used for Fig. 3: each candidate signal of a naive-reuse run is replayed through the same gate.
    """
    from dgg.gate import GradientGate

    gate = GradientGate(tau=tau, window=window, history=history)
    fired = []
    for record in records:
        if record["kind"] != "update" or record.get(key) is None:
            continue
        decision = gate.observe(float(record[key]), int(record["reuse_index"]))
        if decision.discard and decision.reason == "zscore":
            fired.append(int(record["rollouts"]))
    return fired
