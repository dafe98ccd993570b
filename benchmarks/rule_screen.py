"""Screen named reuse rules offline on naive-reuse logs: where each would first stop, and how often if followed.

    python benchmarks/rule_screen.py benchmarks/results/*/fixed_k4_seed*.metrics.jsonl [--out FILE.md]

Each argument is a ``metrics.jsonl`` of a fixed-K run (or a run directory). The rules are the paper's gate at
τ 0.5 and 0.1, SB3's KL stop at 0.05, and the global gradient-norm skip (``gradnorm``) at OLMo-core's defaults
(window 128, 6σ) and with the gate's window (20). A replay is exact up to a rule's first stop only (``dgg
replay``); later stops are what the rule does on this counterfactual trajectory. The first evaluation after
which the run's accuracy fell is listed beside, so a stop can be read against the run's own degradation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gate_screen import read_records

from dgg.reuse_rules import RuleSettings, make_rule, replay

RULES = {
    "dgg τ 0.5": ("dgg", RuleSettings(tau=0.5)),
    "dgg τ 0.1": ("dgg", RuleSettings(tau=0.1)),
    "kl 0.05": ("kl", RuleSettings(target_kl=0.05)),
    "gradnorm 128, 6σ": ("gradnorm", RuleSettings()),
    "gradnorm 20, 6σ": ("gradnorm", RuleSettings(gradnorm_window=20)),
    "gradnorm 20, 3σ": ("gradnorm", RuleSettings(gradnorm_window=20, gradnorm_sigma=3.0)),
}


def first_fall(records: list[dict]) -> str:
    """The batch of the evaluation at which accuracy was last at its peak before falling, or '—'."""
    points = [(r["batch"], r["eval/accuracy"]) for r in records if r.get("kind") == "eval"]
    best = max(range(len(points)), key=lambda i: points[i][1]) if points else None
    if best is None or best == len(points) - 1:
        return "—"
    return f"peak {points[best][1]:.3f} at batch {points[best][0]}"


def screen(path: Path) -> list[str]:
    records = read_records(path)
    attempts = sum(r.get("kind") == "update" for r in records)
    cells = []
    for spec, settings in RULES.values():
        stops = replay(records, make_rule(spec, settings))
        cells.append(f"batch {stops[0]['batch']}, k = {stops[0]['reuse_index']} ({len(stops)})" if stops else "never")
    return [str(path), str(attempts), *cells, first_fall(records)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    header = ["log", "attempts", *(f"{name}: first stop (stops)" for name in RULES), "accuracy"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(screen(path)) + " |" for path in args.logs]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(f"`python benchmarks/rule_screen.py {' '.join(map(str, args.logs))}`\n\n{text}\n")


if __name__ == "__main__":
    main()
