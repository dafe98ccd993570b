"""Per-seed table of a reuse-rules sweep: each arm's converged accuracy and rollout speedup, against
single-use at the same lr and against the best single-use lr (issue "Reuse rules side by side", item 5).

    python benchmarks/reuse_rules_table.py benchmarks/results/reuse-rules-smollm2 [--arms a,b,...]

Reads the committed ``ARM_seedN.metrics.jsonl`` files; the speedup is paper Table 1's (footnote 6): the
baseline's rollouts to first reach its own converged accuracy over the arm's rollouts to reach that accuracy.
"never" means the arm never reached it.
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


def load(results: Path) -> dict[str, dict[int, list]]:
    runs: dict[str, dict[int, list]] = defaultdict(dict)
    for path in sorted(results.glob("*_seed*.metrics.jsonl")):
        finished = re.fullmatch(r"(.+)_seed(\d+)\.metrics\.jsonl", path.name)
        if finished is None:  # ARM_seedN.partialK: stopped after batch K, no converged accuracy to compare
            continue
        arm, seed = finished.groups()
        runs[arm][int(seed)] = eval_points([json.loads(line) for line in path.read_text().splitlines() if line])
    return runs


def rollout_speedup(baseline: list, arm: list) -> float | None:
    target = converged_accuracy(baseline)
    return speedup(cost_to_reach(baseline, target), cost_to_reach(arm, target))


def fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}×"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--arms", default="", help="comma-separated arms to show (default: all)")
    args = parser.parse_args()
    runs = load(args.results)
    seeds = sorted(runs["single"])
    complete_single = {a: s for a, s in runs.items() if SINGLE_USE.fullmatch(a) and sorted(s) == seeds}
    best = max(complete_single, key=lambda a: statistics.fmean(converged_accuracy(p) for p in runs[a].values()))
    shown = [a for a in args.arms.split(",") if a] or sorted(runs)
    print(f"Seeds {seeds}. Best single-use lr over all seeds: `{best}` (mean converged accuracy "
          f"{statistics.fmean(converged_accuracy(p) for p in runs[best].values()):.3f}).\n")
    print("| arm | seed | converged acc. | rollout speedup vs `single` | vs best single-use lr |")
    print("|---|---|---|---|---|")
    for arm in shown:
        for seed in sorted(runs[arm]):
            points = runs[arm][seed]
            if seed not in runs["single"]:  # single-use of this seed did not finish: nothing to compare against
                print(f"| {arm} | {seed} | {converged_accuracy(points):.3f} | no single-use run | no single-use run |")
                continue
            same = rollout_speedup(runs["single"][seed], points)
            against_best = rollout_speedup(runs[best][seed], points) if seed in runs[best] else None
            print(f"| {arm} | {seed} | {converged_accuracy(points):.3f} | {fmt(same)} | {fmt(against_best)} |")


if __name__ == "__main__":
    main()
