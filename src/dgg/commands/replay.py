"""`dgg replay RUN_DIR --rule kl --set target_kl=0.02`: where reuse rules would have stopped on a logged run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

DEFAULT_RULES = ("dgg", "kl", "clip", "m2", "nosignal")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (holds metrics.jsonl), or a metrics .jsonl file")
    parser.add_argument("--rule", action="append", metavar="RULE",
                        help=f"a rule or combination such as dgg+nosignal; repeat for several "
                             f"(default: {', '.join(DEFAULT_RULES)})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a rule setting, e.g. tau=0.1, target_kl=0.02, history=reuse, signal_floor=1e-3")
    parser.add_argument("--json", action="store_true", help="print the stops as JSON")


def parse_settings(assignments: list[str]):
    from dgg.reuse_rules import RuleSettings

    fields = {f.name: f for f in dataclasses.fields(RuleSettings)}
    values = {}
    for assignment in assignments:
        key, _, raw = assignment.partition("=")
        if key not in fields or not raw:
            raise ValueError(f"--set {assignment!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        kind = type(getattr(RuleSettings(), key))
        try:
            values[key] = kind(raw)
        except ValueError:
            raise ValueError(f"--set {assignment!r}: {key} must be a {kind.__name__}") from None
    return RuleSettings(**values)


def check_has_updates(records: list[dict], source) -> None:
    """A log without dgg's per-update records can say nothing about any rule: refuse it (a replay over no update
    would report every rule as "never" stopping, a silent wrong answer)."""
    if any(r.get("kind") == "update" for r in records):
        return
    if records and all("step" in r and "data" in r for r in records):
        raise ValueError(f"{source} is a verl file-logger log: its values are averaged over every mini-batch and "
                         "epoch of a training step, and it has no lm_head energy, so no rule can be replayed on it "
                         "here; replay a dgg run's metrics.jsonl")
    raise ValueError(f"{source} holds no update records (lines with \"kind\": \"update\"), so no rule can be "
                     "replayed on it; replay a dgg run's metrics.jsonl")


def run(args: argparse.Namespace) -> int:
    from dgg.analysis import read_metrics
    from dgg.reuse_rules import RuleSignalMissing, make_rule, replay

    try:
        records = read_metrics(Path(args.run_dir))
        check_has_updates(records, args.run_dir)
        settings = parse_settings(args.set)
        rules = [make_rule(spec, settings) for spec in (args.rule or DEFAULT_RULES)]
        results = {rule.name: replay(records, rule) for rule in rules}
    except (FileNotFoundError, ValueError, RuleSignalMissing) as err:
        if getattr(args, "debug", False):
            raise
        print(f"dgg replay: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    attempts = sum(r.get("kind") == "update" for r in records)
    print(f"{args.run_dir}: {attempts} update attempts. A replay is exact only up to each rule's first stop: "
          "after it the real run would have trained on other weights, so later stops are indicative.")
    print("\n| rule | first stop (batch, k, rollouts) | reason | stops if followed |")
    print("|---|---|---|---|")
    for name, stops in results.items():
        first = f"batch {stops[0]['batch']}, k = {stops[0]['reuse_index']}, {stops[0]['rollouts']}" if stops \
            else "never"
        print(f"| {name} | {first} | {stops[0]['reason'] if stops else '—'} | {len(stops)} |")
    return 0
