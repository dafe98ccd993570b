"""Per-seed table of a reuse-rules sweep: each arm's converged accuracy and rollout speedup, against
single-use at the same lr and against the best single-use lr (issue "Reuse rules side by side", item 5).

    python benchmarks/reuse_rules_table.py benchmarks/results/reuse-rules-smollm2 [--arms a,b,...] [--figure F.png]

Reads the committed ``ARM_seedN.metrics.jsonl`` files; the speedups are paper Table 1's (footnote 6): the
baseline's rollouts (or training seconds) to first reach its own converged accuracy over the arm's to reach that
accuracy. "never" means the arm never reached it. Wall-clock compares only runs that shared the machine the same
way. ``--figure`` draws the shown arms' accuracy against rollouts and wall-clock (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from dgg.analysis import converged_accuracy, cost_to_reach, eval_points, speedup

SINGLE_USE = re.compile(r"single(_lrx[\d.]+)?$")


def load_records(results: Path) -> dict[str, dict[int, list[dict]]]:
    """Each finished run's metrics records, by arm and seed."""
    runs: dict[str, dict[int, list[dict]]] = defaultdict(dict)
    for path in sorted(results.glob("*_seed*.metrics.jsonl")):
        finished = re.fullmatch(r"(.+)_seed(\d+)\.metrics\.jsonl", path.name)
        if finished is None:  # ARM_seedN.partialK: stopped after batch K, no converged accuracy to compare
            continue
        arm, seed = finished.groups()
        runs[arm][int(seed)] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return runs


def arm_labels(results: Path) -> dict[str, str]:
    """The sweep's own names for its arms (experiment.json), for a figure's legend."""
    experiment = results / "experiment.json"
    if not experiment.exists():
        return {}
    return {arm["name"]: arm["label"] for arm in json.loads(experiment.read_text())["arms"]}


def table1_speedup(baseline: list, arm: list, axis: str = "rollouts") -> float | None:
    target = converged_accuracy(baseline)
    return speedup(cost_to_reach(baseline, target, axis), cost_to_reach(arm, target, axis))


def fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}×"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--arms", default="", help="comma-separated arms to show (default: all)")
    parser.add_argument("--figure", type=Path, help="also draw the shown arms' accuracy curves to this PNG")
    args = parser.parse_args()
    records = load_records(args.results)
    runs = {arm: {seed: eval_points(r) for seed, r in seeds.items()} for arm, seeds in records.items()}
    seeds = sorted(runs["single"])
    complete_single = {a: s for a, s in runs.items() if SINGLE_USE.fullmatch(a) and sorted(s) == seeds}
    best = max(complete_single, key=lambda a: statistics.fmean(converged_accuracy(p) for p in runs[a].values()))
    shown = [a for a in args.arms.split(",") if a] or sorted(runs)
    print(f"Seeds {seeds}. Best single-use lr over all seeds: `{best}` (mean converged accuracy "
          f"{statistics.fmean(converged_accuracy(p) for p in runs[best].values()):.3f}).\n")
    print("| arm | seed | converged acc. | rollout speedup vs `single` | wall-clock speedup vs `single` "
          "| vs best single-use lr |")
    print("|---|---|---|---|---|---|")
    for arm in shown:
        for seed in sorted(runs[arm]):
            points = runs[arm][seed]
            if seed not in runs["single"]:  # single-use of this seed did not finish: nothing to compare against
                print(f"| {arm} | {seed} | {converged_accuracy(points):.3f} | no single-use run | | |")
                continue
            same = table1_speedup(runs["single"][seed], points)
            clock = table1_speedup(runs["single"][seed], points, "wall_time")
            against_best = table1_speedup(runs[best][seed], points) if seed in runs[best] else None
            print(f"| {arm} | {seed} | {converged_accuracy(points):.3f} | {fmt(same)} | {fmt(clock)} "
                  f"| {fmt(against_best)} |")
    if args.figure:
        from dgg.plots import plot_accuracy

        plot_accuracy({arm: list(records[arm].values()) for arm in shown}, args.figure, arm_labels(args.results))
        print(f"\nFigure: {args.figure}")


if __name__ == "__main__":
    main()
