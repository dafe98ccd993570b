"""Summarise one setting of the DWD search (docs/reproducing-dwd.md) from its four runs' metrics files.

    python benchmarks/dwd_search.py RUNS_ROOT SETTING [SETTING ...] [--seed 0]

Expects ``RUNS_ROOT/<setting>_s<seed>_<arm>/metrics.jsonl`` for arms ``single``, ``naive`` (fixed K),
``dgga`` (DGG, reuse.history=all, the paper's) and ``dggr`` (DGG, reuse.history=reuse); missing arms are
skipped. Per setting it prints: converged/peak accuracy per arm, whether naive reuse collapsed (peak −
converged > 0.10) and its onset (the peak evaluation), the surge ratio of each weight component of the naive
run (max relative weight change in the onset window [onset − 10, onset + 20] batches over the median before
that window), the first gate discard of each DGG run and where the paper's rule, replayed on the naive run's
lm_head energy, would first fire (both histories), and each DGG run's rollout speedup to single's converged
accuracy (dgg.analysis.compare_to_baseline).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dgg.analysis import compare_to_baseline, degradation_onset, eval_points, read_metrics, signal_firings

ARMS = ("single", "naive", "dgga", "dggr")
COMPONENTS = ("lm_head", "attn", "mlp", "embed")
WINDOW_BEFORE, WINDOW_AFTER = 10, 20  # batches around the onset that count as "at the collapse"


def surge_ratios(records: list[dict], onset_batch: int) -> dict[str, float | None]:
    """Per component: max relative weight change in the onset window / median relative change before it."""
    weights = [r for r in records if r["kind"] == "weights"]
    ratios = {}
    for c in COMPONENTS:
        before = [r[f"weights/{c}"] for r in weights if r["batch"] < onset_batch - WINDOW_BEFORE]
        during = [r[f"weights/{c}"] for r in weights
                  if onset_batch - WINDOW_BEFORE <= r["batch"] <= onset_batch + WINDOW_AFTER]
        ratios[c] = max(during) / statistics.median(before) if before and during else None
    return ratios


def first_discard(records: list[dict]) -> int | None:
    for r in records:
        if r["kind"] == "update" and r.get("gate/discard") and r.get("gate/reason") == "zscore":
            return int(r["batch"])
    return None


def summarise_setting(root: Path, setting: str, seed: int, tau: float) -> dict:
    runs = {}
    for arm in ARMS:
        d = root / f"{setting}_s{seed}_{arm}"
        if (d / "metrics.jsonl").is_file():
            runs[arm] = read_metrics(d)
    out: dict = {"setting": setting, "seed": seed}
    summaries = compare_to_baseline(runs)  # without a single-use run the speedups stay None
    for arm, records in runs.items():
        s = summaries[arm]
        out[arm] = {"converged": s.converged_accuracy, "peak": s.peak_accuracy, "initial": s.initial_accuracy,
                    "collapsed": s.collapsed, "speedup": s.rollout_speedup, "discards": s.discards,
                    "first_discard_batch": first_discard(records), "reuse_per_batch": s.mean_reuse_per_batch,
                    "batches": records[-1]["batch"]}
    if "naive" in runs:
        naive = runs["naive"]
        onset = degradation_onset(eval_points(naive))
        n = out["naive"]
        n["onset_batch"] = onset.batch if onset else None
        n["surge"] = surge_ratios(naive, onset.batch) if onset else None
        per_batch = next(r["rollouts"] for r in naive if r["kind"] == "rollout")
        for history in ("all", "reuse"):
            fired = signal_firings(naive, "actor/lm_head_grad_energy", tau, 20, history)
            n[f"replay_first_fire_{history}"] = fired[0] // per_batch if fired else None
            n[f"replay_fires_{history}"] = len(fired)
    return out


def fmt(v, d=2):
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.{d}f}" if isinstance(v, float) else str(v)


def row(o: dict) -> str:
    s, n, a, r = (o.get(k, {}) for k in ("single", "naive", "dgga", "dggr"))
    surge = n.get("surge") or {}
    return (f"| {o['setting']} | {o['seed']} | {fmt(s.get('initial'))} | {fmt(s.get('peak'))}/{fmt(s.get('converged'))} | "
            f"{fmt(n.get('peak'))}/{fmt(n.get('converged'))} | {fmt(n.get('collapsed'))} @{fmt(n.get('onset_batch'))} | "
            f"{fmt(surge.get('lm_head'), 1)} / {fmt(surge.get('attn'), 1)} / {fmt(surge.get('mlp'), 1)} | "
            f"{fmt(n.get('replay_first_fire_all'))} / {fmt(n.get('replay_first_fire_reuse'))} | "
            f"{fmt(a.get('converged'))} {fmt(a.get('collapsed'))} d{fmt(a.get('discards'))}@{fmt(a.get('first_discard_batch'))} "
            f"x{fmt(a.get('speedup'))} | "
            f"{fmt(r.get('converged'))} {fmt(r.get('collapsed'))} d{fmt(r.get('discards'))}@{fmt(r.get('first_discard_batch'))} "
            f"x{fmt(r.get('speedup'))} |")


HEADER = ("| setting | seed | init | single peak/conv | naive peak/conv | naive collapsed @onset | "
          "surge lm_head/attn/mlp | replay 1st fire all/reuse | DGG all: conv coll. discards@first ×speedup | "
          "DGG reuse: conv coll. discards@first ×speedup |\n|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("settings", nargs="+")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    print(HEADER)
    for setting in args.settings:
        for seed in args.seeds:
            o = summarise_setting(Path(args.root), setting, seed, args.tau)
            print(json.dumps(o) if args.json else row(o))


if __name__ == "__main__":
    main()
