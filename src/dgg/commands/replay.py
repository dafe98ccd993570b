"""`dgg replay LOG --rule kl --set target_kl=0.02`: where reuse rules would have stopped on a logged run.

LOG is a dgg run directory or metrics file, a TRL output directory or trainer_state.json, a verl file-logger
jsonl, TensorBoard event files (a file or a directory holding them), or a W&B history exported as CSV or JSON
(dgg.replay_logs). Each rule is labelled exact, approximate or
impossible for that log; an impossible rule is reported and the command exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

DEFAULT_RULES = ("dgg", "kl", "clip", "m2", "nosignal", "gradnorm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="LOG",
                        help="a dgg run directory or metrics .jsonl, a TRL output directory or trainer_state.json, "
                             "a verl file-logger .jsonl, TensorBoard event files, or a W&B history .csv/.json")
    parser.add_argument("--rule", action="append", metavar="RULE",
                        help=f"a rule or combination such as dgg+nosignal; repeat for several "
                             f"(default: {', '.join(DEFAULT_RULES)})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a rule setting, e.g. tau=0.1, target_kl=0.02, history=reuse, signal_floor=1e-3")
    parser.add_argument("--reuse", type=int, default=None, metavar="K",
                        help="a plain TRL log's updates per rollout batch (num_iterations, one optimizer step per "
                             "pass), which it does not record")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the signals and each rule's first stop")
    parser.add_argument("--json", action="store_true", help="print the labels and stops as JSON")


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
    """A log without per-update records can say nothing about any rule: refuse it (a replay over no update
    would report every rule as "never" stopping, a silent wrong answer)."""
    if not any(r.get("kind") == "update" for r in records):
        raise ValueError(f"{source} holds no update records, so no rule can be replayed on it")


def run(args: argparse.Namespace) -> int:
    from dgg.errors import UserError
    from dgg.replay_logs import read_replay_log
    from dgg.reuse_rules import RuleSignalMissing, make_rule, parse_rule_names, replay

    if args.reuse is not None and args.reuse < 1:
        print("dgg replay: error: --reuse must be an integer >= 1", file=sys.stderr)
        return 2
    try:
        log = read_replay_log(Path(args.run_dir), args.reuse)
        check_has_updates(log.records, log.source)
        settings = parse_settings(args.set)
        results = {}
        for spec in args.rule or DEFAULT_RULES:
            rule = make_rule(spec, settings)
            label, why = log.judge(parse_rule_names(spec), settings)
            stops = replay(log.records, rule) if label != "impossible" else []
            results[rule.name] = {"replay": label, "why": why, "stops": stops}
    except (FileNotFoundError, ValueError, RuleSignalMissing, UserError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"dgg replay: error: {err}", file=sys.stderr)
        return 2
    impossible = {name: r["why"] for name, r in results.items() if r["replay"] == "impossible"}
    if args.json:
        print(json.dumps({"source": log.source, "rollouts_per_update": log.rollouts_per_update, "rules": results},
                         indent=2))
    else:
        print_table(log, results)
    if args.plot:
        from dgg.plots import plot_replay

        print(f"figure: {plot_replay(log.records, results, Path(args.plot))}")
    for name, why in impossible.items():
        print(f"dgg replay: error: {name} cannot be replayed on this log: {why}", file=sys.stderr)
    return 2 if impossible else 0


def print_table(log, results: dict) -> None:
    attempts = sum(r.get("kind") == "update" for r in log.records)
    print(f"{log.source}: {attempts} update records. A replay is exact only up to each rule's first stop: after "
          "it the real run would have trained on other weights, so later stops are indicative.")
    for note in log.notes:
        print(f"Note: {note}.")
    per_update = log.rollouts_per_update
    print("\n| rule | replay | first stop (batch, k) | stops if followed | updates skipped | "
          f"{'rollouts those updates used' if per_update else 'rollouts'} |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        stops = result["stops"]
        label = result["replay"] + ("" if result["replay"] == "exact" else f" ({result['why']})")
        if result["replay"] == "impossible":
            print(f"| {name} | {label} | — | — | — | — |")
            continue
        first = f"batch {stops[0]['batch']}, k = {stops[0]['reuse_index']}" if stops else "never"
        skipped = sum(s["updates_skipped"] for s in stops)
        rollouts = f"{skipped * per_update:g}" if per_update else "unknown"
        print(f"| {name} | {label} | {first} | {len(stops)} | {skipped} | {rollouts} |")
