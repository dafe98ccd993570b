"""Batch by batch, what a run's reuse did: reward, signal, updates applied, why reuse stopped, drift.

    python benchmarks/batch_timeline.py runs/bench/search-T1.0/nosignal_0.001/seed1 \
        benchmarks/results/search-T1.0-smollm2/fixed_k4_seed1.partial6.metrics.jsonl --to 10

Each argument is a run directory or a ``metrics.jsonl`` file, finished or not (a stopped run's log reads up to
where it stopped). One markdown table per run, one row per rollout batch: the batch's mean reward, the share
of groups whose rewards were all equal (no advantage, no gradient), the updates applied out of those
attempted, the reasons reuse stopped or a step was dropped, and at the last attempted step the k3 KL to π_old,
the largest importance ratio and the lm_head energy; a held-out evaluation is printed as its own row. Two runs
that share a seed share every number up to the first step where their rules decide differently, so the tables
show where they part and what followed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gate_screen import (
    read_records,  # the sibling script's reader: a run dir or file, a torn last line skipped
)


def fmt(value, digits=3):
    return "—" if value is None else f"{value:.{digits}g}"


def timeline(records: list[dict], last_batch: int | None = None) -> list[str]:
    """Markdown rows; updates are logged before their batch's rollout summary, evaluations after it."""
    rows, updates = [], {}
    for record in records:
        batch = record.get("batch")
        if last_batch is not None and batch is not None and batch > last_batch:
            break
        if record["kind"] == "update":
            updates.setdefault(batch, []).append(record)
        elif record["kind"] == "rollout":
            attempts = updates.get(batch, [])
            applied = sum(bool(u["actor/applied"]) for u in attempts)
            reasons = sorted({u["reuse/stop_reason"] for u in attempts if u.get("reuse/stop_reason")})
            last = attempts[-1] if attempts else {}
            rows.append(f"| {batch} | {record['reward/mean']:.3f} | {record['reward/zero_std_groups']:.2f} | "
                        f"{applied}/{len(attempts)} | {', '.join(reasons) or '—'} | {fmt(last.get('actor/kl'))} | "
                        f"{fmt(last.get('actor/ratio_max'))} | {fmt(last.get('actor/lm_head_grad_energy'))} |")
        elif record["kind"] == "eval":
            rows.append(f"| eval at batch {batch} | **{record['eval/accuracy']:.3f}** | | | | | | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or metrics.jsonl files")
    parser.add_argument("--to", type=int, default=None, metavar="BATCH", help="stop after this batch")
    args = parser.parse_args()
    for path in args.runs:
        print(f"\n{path}\n")
        print("| batch | reward | no-signal groups | applied | stop reasons | KL, last step | ratio max | "
              "lm_head energy |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(timeline(read_records(path), args.to)))


if __name__ == "__main__":
    main()
