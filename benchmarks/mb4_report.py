"""Per-seed report of the mini-batch reuse sweep (issue "Evidence where practitioners reuse", item 4).

    python benchmarks/mb4_report.py --single benchmarks/results/mb4-single-lr-grid-smollm2 \\
        [--single benchmarks/results/s1-single-lr-grid-smollm2] benchmarks/results/mb4-reuse-smollm2 \\
        [--out report.md] [--weights-figure fig1.png]

Every directory holds finished runs named ``NAME_lrLR_seedN.metrics.jsonl`` (``single`` is S4: one pass in 4
mini-batches; ``s1`` one full-batch update; the reuse arms by their sweep names). Files with ``.partial`` in
the name are runs stopped part-way and are left out.

1. The single-use candidates (regime × lr) and the best of them: the highest converged accuracy on the seed mean
   among those finished on every seed the reuse arms have.
2. Per reuse arm and seed, against the best single-use on the same seed: converged accuracy and its shortfall,
   paper Table 1's rollout and wall-clock speedups (``dgg.analysis``), the updates applied, where the arm's rule
   first acted (a discard before AdamW or a stop of the batch's reuse), pass 2's lm_head energy against pass 1's
   on the same rows (``reuse.mini_batch_order=fixed``), the negative-advantage share of that energy per pass, and
   Fig. 1's weight change after the first batches: each component's largest change per Δ updates over its
   median, and the lm_head's change over the MLP's (a DWD surge shows as a large lm_head value while attention
   and MLP stay near theirs).
3. Per arm: the smallest rollout speedup over seeds, the number the issue's goal (≥ 2× on every seed) is about.
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict
from pathlib import Path

from gate_screen import read_records, same_sample_ratios
from reuse_rules_table import fmt, table1_speedup

from dgg.analysis import converged_accuracy, eval_points
from dgg.run_environment import machine_label, read_environment

RUN_NAME = re.compile(r"(.+)_lr([0-9.e+-]+)_seed(\d+)\.metrics\.jsonl")
GOAL = 2.0  # the goal: ≥ 2× fewer rollouts than the best single-use, on every seed
COMPONENTS = ("lm_head", "attn", "mlp")
WARMUP_BATCHES = 5  # AdamW's first steps move every component most; Fig. 1's columns read the run after them

Runs = dict[tuple[str, str], dict[int, list[dict]]]  # (name, lr) -> seed -> records


def load_runs(directory: Path) -> Runs:
    if not directory.is_dir():
        raise SystemExit(f"mb4_report: {directory} is not a directory of metrics files")
    runs: Runs = defaultdict(dict)
    for path in sorted(directory.glob("*.metrics.jsonl")):
        match = RUN_NAME.fullmatch(path.name)
        if match:
            name, lr, seed = match.groups()
            runs[(name, lr)][int(seed)] = read_records(path)
    return runs


def machines_line(directories: list[Path]) -> str:
    """Which machine each run trained on, from the ``NAME.environment.jsonl`` that benchmarks/harvest_run.py copies
    beside a run's metrics (runs harvested before dgg wrote it count as not recorded)."""
    runs: dict[str, list[str]] = defaultdict(list)
    for directory in directories:
        for path in sorted(directory.glob("*.metrics.jsonl")):
            if not RUN_NAME.fullmatch(path.name):
                continue
            name = path.name.removesuffix(".metrics.jsonl")
            lines = read_environment(path.with_name(name + ".environment.jsonl"))
            label = "; then ".join(dict.fromkeys(machine_label(line) for line in lines)) or "not recorded"
            runs[label].append(name)
    return "Machines: " + " · ".join(f"{label}: {len(names)} run(s)" for label, names in sorted(runs.items())) + "."


def converged(records: list[dict]) -> float:
    value = converged_accuracy(eval_points(records))
    if value is None:
        raise SystemExit("mb4_report: a finished run has no evaluation")
    return value


def first_action(records: list[dict]) -> str:
    """Where the run's rule first discarded an update or stopped a batch's reuse: 'batch b, k.m (reason)'."""
    for r in records:
        if r.get("kind") == "update" and (r.get("gate/discard") or r.get("reuse/stop")):
            step = f"{r['reuse_index']}.{r.get('mini_batch', 0) + 1}"
            reason = r.get("reuse/stop_reason") or r.get("gate/reason") or "discard"
            return f"batch {r['batch']}, {step} ({reason})"
    return "never"


def applied_updates(records: list[dict]) -> int:
    return sum(1 for r in records if r.get("kind") == "update" and r.get("actor/applied"))


def neg_share_by_pass(records: list[dict]) -> dict[int, float]:
    shares: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r.get("kind") == "update" and r.get("energy/neg_share") is not None:
            shares[r["reuse_index"]].append(float(r["energy/neg_share"]))
    return {k: statistics.fmean(v) for k, v in sorted(shares.items())}


def weight_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("kind") == "weights" and r["batch"] > WARMUP_BATCHES]


def weight_surges(records: list[dict]) -> dict[str, float]:
    """Each component's largest relative weight change per Δ updates over its median, after the warm-up."""
    out = {}
    for component in COMPONENTS:
        values = [r[f"weights/{component}"] for r in weight_records(records)
                  if r.get(f"weights/{component}") is not None]
        if values and statistics.median(values) > 0:
            out[component] = max(values) / statistics.median(values)
    return out


def lm_head_share(records: list[dict]) -> tuple[float, float] | None:
    """Median and largest, after the warm-up, of the lm_head's relative weight change over the MLP's."""
    ratios = [r["weights/lm_head"] / r["weights/mlp"] for r in weight_records(records) if r.get("weights/mlp")]
    return (statistics.median(ratios), max(ratios)) if ratios else None


def best_single_use(singles: Runs, seeds: list[int]) -> tuple[tuple[str, str], list[str]]:
    """The single-use setting with the highest converged accuracy on the mean of all its seeds, among those
    finished on every seed any single-use setting has, which must include the arms' ``seeds``."""
    all_seeds = sorted({s for by_seed in singles.values() for s in by_seed} | set(seeds))
    lines = ["| single-use | lr | converged per seed | mean |", "|---|---|---|---|"]
    complete = {}
    for (name, lr), by_seed in sorted(singles.items()):
        per_seed = {s: converged(r) for s, r in sorted(by_seed.items())}
        if sorted(per_seed) == all_seeds:
            complete[(name, lr)] = statistics.fmean(per_seed.values())
        lines.append(f"| {name} | {lr} | {' / '.join(f'{s}: {v:.3f}' for s, v in per_seed.items())} | "
                     f"{f'{complete[(name, lr)]:.3f}' if (name, lr) in complete else 'not on every seed'} |")
    if not complete:
        raise SystemExit(f"mb4_report: no single-use setting finished on every seed ({all_seeds})")
    best = max(complete, key=complete.__getitem__)
    lines.append(f"\nBest single-use on the mean of seeds {all_seeds}: **{best[0]} at lr {best[1]}** "
                 f"({complete[best]:.3f}).")
    return best, lines


def arm_rows(arm: tuple[str, str], by_seed: dict[int, list[dict]], baseline: dict[int, list[dict]]
             ) -> tuple[list[str], list[float | None]]:
    rows, speedups = [], []
    for seed, records in sorted(by_seed.items()):
        points, base_points = eval_points(records), eval_points(baseline[seed])
        accuracy, target = converged(records), converged(baseline[seed])
        rollouts = table1_speedup(base_points, points)
        clock = table1_speedup(base_points, points, "wall_time")
        speedups.append(rollouts)
        same = same_sample_ratios(records).get(2, [])
        same_cell = (f"{sum(x > 1 for x in same)} of {len(same)}; {statistics.median(same):.2f} / {max(same):.1f}"
                     if same else "—")
        shares = neg_share_by_pass(records)
        surges = weight_surges(records)
        share = lm_head_share(records)
        rows.append(
            f"| {arm[0]} | {seed} | {accuracy:.3f} | {accuracy - target:+.3f} | "
            f"{fmt(rollouts)} | {fmt(clock)} | {applied_updates(records)} | {first_action(records)} | "
            f"{same_cell} | {' / '.join(f'{v:.2f}' for v in shares.values()) or '—'} | "
            f"{' / '.join(f'{surges[c]:.1f}' for c in COMPONENTS if c in surges) or '—'} | "
            f"{'—' if share is None else f'{share[0]:.2f} / {share[1]:.2f}'} |")
    return rows, speedups


def load_sweep(single_dirs: list[Path], arms_dir: Path) -> tuple[Runs, Runs]:
    """The single-use runs of every ``single_dirs`` and the reuse arms' runs."""
    singles: Runs = {}
    for directory in single_dirs:
        singles.update(load_runs(directory))
    arms = load_runs(arms_dir)
    if not arms:
        raise SystemExit(f"mb4_report: no finished run (NAME_lrLR_seedN.metrics.jsonl) in {arms_dir}")
    return singles, arms


def report(singles: Runs, arms: Runs) -> tuple[list[str], tuple[str, str]]:
    """The report's lines and the best single-use setting (name, lr)."""
    seeds = sorted({s for by_seed in arms.values() for s in by_seed})
    best, lines = best_single_use(singles, seeds)
    baseline = singles[best]
    lines += ["", f"Against {best[0]} at lr {best[1]} on the same seed. Speedups are paper Table 1's (cost to reach "
              "the baseline's converged accuracy, evaluations every 5 batches); wall-clock only compares runs that "
              "shared the machine the same way. *same rows*: pass-2 mini-batches whose lm_head energy exceeded "
              "pass 1's on the same rows, of all compared; median / largest ratio. *neg. share*: the "
              "negative-advantage share of the lm_head energy, mean per pass. *weight surge*: each component's "
              "largest relative weight change per Δ updates over its median (lm_head / attn / mlp). "
              "*lm_head/mlp*: median / largest ratio of their relative weight changes. Both weight columns leave "
              f"out the first {WARMUP_BATCHES} batches, where AdamW's first steps move every component most.", "",
              "| arm | seed | converged | vs best | rollout speedup | wall-clock speedup | updates applied | "
              "first acted (batch, pass.mini-batch) | same rows: > pass 1; median / max | neg. share pass 1 / 2 | weight surge | "
              "lm_head/mlp: median / max |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    # The baseline against itself first: its energy and weight-change columns are Fig. 1's contrast.
    lines += arm_rows(best, baseline, baseline)[0]
    verdicts = []
    for arm in sorted(arms):
        by_seed = {s: r for s, r in arms[arm].items() if s in baseline}
        rows, speedups = arm_rows(arm, by_seed, baseline)
        lines += rows
        worst = None if any(v is None for v in speedups) else min(speedups)
        short = [seed for seed, v in zip(sorted(by_seed), speedups, strict=True) if v is None or v < GOAL]
        if short:  # one seed short of the goal settles it, whatever the seeds still to run do
            verdict = f"not met (short on seed {', '.join(map(str, short))})"
        else:
            verdict = "met" if sorted(by_seed) == sorted(baseline) else "open (not every seed finished)"
        verdicts.append(f"- {arm[0]} (lr {arm[1]}, seeds {sorted(by_seed)}): smallest rollout speedup "
                        f"{fmt(worst)}; goal ≥ {GOAL:.0f}× on every seed {verdict}.")
    return [*lines, "", *verdicts], best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arms", type=Path, help="directory of the reuse arms' finished metrics files")
    parser.add_argument("--single", type=Path, action="append", required=True,
                        help="directory of single-use runs (repeat for S1 and S4)")
    parser.add_argument("--out", type=Path, help="also write the report to this markdown file")
    parser.add_argument("--weights-figure", type=Path,
                        help="draw Fig. 1 (weight change per component) for the best single-use and --figure-arms")
    parser.add_argument("--figure-arms", default="naive,dgg_tau0.5,kl", help="comma-separated arms in the figure")
    parser.add_argument("--figure-seed", type=int, default=0)
    args = parser.parse_args()
    singles, arms = load_sweep(args.single, args.arms)
    lines, best = report(singles, arms)
    lines += ["", machines_line([*args.single, args.arms])]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.weights_figure:
        from dgg.plots import plot_weight_change

        seed = args.figure_seed
        shown = {f"{best[0]} lr {best[1]}, seed {seed}": singles[best][seed]}
        wanted = args.figure_arms.split(",")
        shown.update({f"{name}, seed {seed}": by_seed[seed] for (name, _), by_seed in
                      sorted(arms.items(), key=lambda item: wanted.index(item[0][0]) if item[0][0] in wanted else 0)
                      if name in wanted and seed in by_seed})
        plot_weight_change(shown, args.weights_figure)
        print(f"\nFigure: {args.weights_figure}")


if __name__ == "__main__":
    main()
