"""Screen variants of the paper's gate offline on naive-reuse logs (issue 16, item 2).

    python benchmarks/gate_screen.py benchmarks/results/reuse-rules-smollm2/fixed_k4_seed{0,1,2}.metrics.jsonl
    python benchmarks/gate_screen.py runs/bench/search-T1.0/fixed_k4/seed0 --windows 3,5,8 --taus 0.1,0.5,1

Each argument is a run directory or a ``metrics.jsonl`` file of a fixed-K run. Two tables:

1. How the lm_head gradient energy moves within a reuse pass: per reuse index k, the median and the largest of
   g_k / g_1 over the run's batches, and how many batches had g_k > g_1. Where the log names each update's rows
   (``mini_batch_rows``), also each reuse mini-batch against the pass-1 mini-batch with the same samples. The paper's mechanism predicts a surge
   during reuse (g_k well above g_1 on the batches where training turns); a pass in which the energy only
   decays gives a relative-energy rule nothing to find. With ``reuse.mini_batches`` > 1 the rows are the
   updates k.m (pass k, mini-batch m), each against the batch's first update.
2. Where the gate would first stop, and how often if followed, for each ``history`` (the paper's ``all``,
   ``reuse``, ``same_k``) × window × τ. A replay is exact up to the first stop (``dgg replay``); batches with
   an accuracy evaluation are listed beside it, so a stop can be read against the run's own degradation.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dgg.analysis import eval_points
from dgg.reuse_rules import RuleSettings, make_rule, replay


def read_records(path: Path) -> list[dict]:
    file = path / "metrics.jsonl" if path.is_dir() else path
    records = []
    for line in file.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of a run still in progress
            break
    return records


def energies_by_batch(records: list[dict]) -> dict[int, dict[tuple[int, int], float]]:
    """Per batch, the lm_head energy of each update keyed by (k, m): reuse pass k, mini-batch m within it
    (m is always 1 with ``reuse.mini_batches=1``)."""
    out: dict[int, dict[tuple[int, int], float]] = {}
    for r in records:
        if r.get("kind") == "update" and r.get("actor/lm_head_grad_energy") is not None:
            per_step = out.setdefault(r["batch"], {})
            k = r["reuse_index"]
            m = 1 + sum(1 for step in per_step if step[0] == k)
            per_step[(k, m)] = float(r["actor/lm_head_grad_energy"])
    return out


def step_label(step: tuple[int, int], mini_batches: int) -> str:
    return str(step[0]) if mini_batches == 1 else f"{step[0]}.{step[1]}"


def relative_energy_rows(energies: dict[int, dict[tuple[int, int], float]]
                         ) -> list[tuple[tuple[int, int], float, float, int, int]]:
    """(step, median g/g_1, max g/g_1, batches with g > g_1, batches counted) for every update after the
    batch's first, g_1 being the first update's energy; batches whose first energy is 0 (no advantage
    anywhere) are left out."""
    ratios: dict[tuple[int, int], list[float]] = {}
    for per_step in energies.values():
        first = per_step.get((1, 1), 0.0)
        if first > 0:
            for step, energy in per_step.items():
                if step != (1, 1):
                    ratios.setdefault(step, []).append(energy / first)
    return [(step, statistics.median(v), max(v), sum(x > 1 for x in v), len(v)) for step, v in sorted(ratios.items())]


def same_sample_ratios(records: list[dict]) -> dict[int, list[float]]:
    """Per reuse pass k > 1: g of each mini-batch over g of the pass-1 mini-batch that trained on the same rows
    (``mini_batch_rows``, logged since 2026-12-07; the same rows recur with ``reuse.mini_batch_order=fixed``).
    Mini-batches whose rows pass 1 never used together, or whose pass-1 energy is 0, are left out."""
    first: dict[tuple[int, tuple[int, ...]], float] = {}
    ratios: dict[int, list[float]] = {}
    for r in records:
        if r.get("kind") != "update" or r.get("mini_batch_rows") is None or r.get("actor/lm_head_grad_energy") is None:
            continue
        key = (r["batch"], tuple(r["mini_batch_rows"]))
        if r["reuse_index"] == 1:
            first[key] = float(r["actor/lm_head_grad_energy"])
        elif first.get(key, 0.0) > 0:
            ratios.setdefault(r["reuse_index"], []).append(float(r["actor/lm_head_grad_energy"]) / first[key])
    return dict(sorted(ratios.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--windows", default="3,5,8,20", help="windows W for history=same_k (comma-separated)")
    parser.add_argument("--taus", default="0.1,0.5,1.0")
    args = parser.parse_args()
    taus = [float(t) for t in args.taus.split(",")]
    variants = [("all", 20), ("reuse", 20), *(("same_k", int(w)) for w in args.windows.split(","))]
    for path in args.runs:
        records = read_records(path)
        evals = ", ".join(f"{p.batch}: {p.accuracy:.2f}" for p in eval_points(records))
        print(f"## {path}\n\naccuracy by batch: {evals}\n")
        energies = energies_by_batch(records)
        mini_batches = max((m for per_step in energies.values() for _, m in per_step), default=1)
        step_name = "k" if mini_batches == 1 else "k.m (pass, mini-batch)"
        print(f"| {step_name} | median g/g_1 | max g/g_1 | batches with g > g_1 |\n|---|---|---|---|")
        for step, median, largest, rising, counted in relative_energy_rows(energies):
            print(f"| {step_label(step, mini_batches)} | {median:.2g} | {largest:.2g} | {rising} of {counted} |")
        if same := same_sample_ratios(records):
            print("\nAgainst the pass-1 mini-batch with the same samples:\n\n"
                  "| k | median g/g(pass 1) | max | mini-batches with g > g(pass 1) |\n|---|---|---|---|")
            for k, values in same.items():
                print(f"| {k} | {statistics.median(values):.2g} | {max(values):.2g} | "
                      f"{sum(v > 1 for v in values)} of {len(values)} |")
        print("\n| history | W | " + " | ".join(f"τ={t:g}: first stop (batch, k); stops" for t in taus) + " |")
        print("|---|---|" + "---|" * len(taus))
        for history, window in variants:
            cells = []
            for tau in taus:
                stops = replay(records, make_rule("dgg", RuleSettings(tau=tau, window=window, history=history)))
                first = f"{stops[0]['batch']}, {stops[0]['reuse_index']}" if stops else "never"
                cells.append(f"{first}; {len(stops)}")
            print(f"| {history} | {window} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
