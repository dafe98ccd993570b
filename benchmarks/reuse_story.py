"""The numbers behind docs/reproducing-dwd.md's SmolLM2 section, from a `dgg bench reuse-rules` directory.

    python benchmarks/reuse_story.py runs/bench/reuse-rules-smollm2 [--seed 0]

Per finished arm: held-out accuracy at each evaluation and the Table-1 numbers against single-use. For the
naive (fixed-K) arm: per reuse index k, the medians of the signals a rule could read (lm_head energy, k3 KL,
clip fraction, largest ratio) and of the negative-advantage share of the lm_head energy (when the run logged
``profile.energy_split_every``); the relative weight change per component before and after the onset of
degradation (Fig. 1); and where each reuse rule would first have stopped on that log (``dgg replay``; exact up
to that stop).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from dgg.analysis import compare_to_baseline, degradation_onset, eval_points, read_metrics
from dgg.reuse_rules import RuleSettings, make_rule, replay


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=3):
    return "—" if value is None else f"{value:.{digits}g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.directory)
    runs = {d.name: read_metrics(d / f"seed{args.seed}") for d in sorted(out.iterdir())
            if (d / f"seed{args.seed}" / "done.json").is_file()}
    print(f"finished arms (seed {args.seed}): {', '.join(runs)}\n")

    print("| arm | " + " | ".join(f"batch {p.batch}" for p in eval_points(runs["single"])) + " |")
    print("|---|" + "---|" * len(eval_points(runs["single"])))
    for name, records in runs.items():
        print(f"| {name} | " + " | ".join(f"{p.accuracy:.3f}" for p in eval_points(records)) + " |")

    summaries = compare_to_baseline(runs, "single")
    print("\n| arm | converged | peak | rollout speedup | wall-clock speedup | collapsed | stops (reasons) | "
          "updates/batch |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in summaries.items():
        print(f"| {name} | {fmt(s.converged_accuracy)} | {fmt(s.peak_accuracy)} | {fmt(s.rollout_speedup)} | "
              f"{fmt(s.wall_clock_speedup)} | {s.collapsed} | {sum(s.stops_by_reason.values())} "
              f"{s.stops_by_reason or ''} | {fmt(s.mean_reuse_per_batch)} |")

    naive_name = next((n for n in runs if n.startswith("fixed_")), None)
    if naive_name is None:
        return
    naive = runs[naive_name]
    updates = [r for r in naive if r["kind"] == "update"]
    print(f"\n{naive_name}: medians per reuse index k over {len(updates)} attempts")
    print("| k | lm_head energy | k3 KL | clip fraction | ratio max | negative share of energy |")
    print("|---|---|---|---|---|---|")
    for k in sorted({r["reuse_index"] for r in updates}):
        rows = [r for r in updates if r["reuse_index"] == k]
        print(f"| {k} | {fmt(median(r['actor/lm_head_grad_energy'] for r in rows))} | "
              f"{fmt(median(r['actor/kl'] for r in rows))} | {fmt(median(r['actor/clip_ratio'] for r in rows))} | "
              f"{fmt(median(r['actor/ratio_max'] for r in rows))} | "
              f"{fmt(median(r.get('energy/neg_share') for r in rows))} |")

    onset = degradation_onset(eval_points(naive))
    weights = [r for r in naive if r["kind"] == "weights"]
    if weights:
        split_at = onset.rollouts if onset else None
        print(f"\nrelative weight change per component (median), onset of degradation: "
              f"{'none' if onset is None else f'batch {onset.batch} ({onset.rollouts} rollouts)'}")
        for label, rows in (("before onset", [r for r in weights if split_at is None or r["rollouts"] <= split_at]),
                            ("after onset", [r for r in weights if split_at is not None and r["rollouts"] > split_at])):
            if rows:
                parts = {c: median(r.get(f"weights/{c}") for r in rows) for c in ("lm_head", "attn", "mlp", "embed")}
                print(f"  {label}: " + ", ".join(f"{c} {fmt(v)}" for c, v in parts.items()))

    print("\nwhere each rule would first stop on the naive log (exact up to that stop):")
    screens = [("dgg", {}), ("dgg", {"history": "reuse"}), ("kl", {"target_kl": 0.02}), ("kl", {"target_kl": 0.05}),
               ("kl", {"target_kl": 0.2}), ("clip", {"target_clip": 0.2}), ("nosignal", {})]
    for spec, settings in screens:
        stops = replay(naive, make_rule(spec, RuleSettings(**settings)))
        first = f"batch {stops[0]['batch']}, k = {stops[0]['reuse_index']}" if stops else "never"
        print(f"  {spec} {settings or ''}: first stop {first}; {len(stops)} stops if followed")


if __name__ == "__main__":
    main()
