"""`dgg bench NAME [--seeds 3] [key=value ...]`: the paper's experiments as resumable benchmark runs."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dgg.experiments import EXPERIMENTS

    parser.add_argument("name", help=f"experiment: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm: 0 .. N-1 (default 3)")
    parser.add_argument("--seed-list", default=None, metavar="S,...",
                        help="run exactly these seeds instead (e.g. 1,2 to add seeds to a sweep run on seed 0)")
    parser.add_argument("-c", "--config", default="demo", help="base config (YAML path or bundled name; default demo)")
    parser.add_argument("--out", default=None, help="directory (default runs/bench/NAME)")
    parser.add_argument("--force", action="store_true", help="re-run arms that already finished")
    parser.add_argument("--arms", default=None, metavar="NAME,...",
                        help="run only these arms, in this order (the report still covers every arm that has runs)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides applied to every arm")


def select_arms(arms: list, spec: str | None) -> list | None:
    """The arms named in ``spec`` (comma-separated, in that order), all arms for None, None if a name is unknown.
    An arm's baseline is run first when it is not already selected, since speedups need it."""
    if spec is None:
        return arms
    by_name = {a.name: a for a in arms}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names or any(n not in by_name for n in names):
        return None
    chosen: list = []
    for name in names:
        for needed in (by_name[name].baseline, name):
            if needed in by_name and by_name[needed] not in chosen:
                chosen.append(by_name[needed])
    return chosen


def parse_seed_list(spec: str) -> list[int] | None:
    """``"1,2"`` -> [1, 2]; None unless every item is an integer >= 0 and none repeats."""
    items = [item.strip() for item in spec.split(",")]
    if not all(item.isdigit() for item in items):
        return None
    seeds = [int(item) for item in items]
    return seeds if len(set(seeds)) == len(seeds) else None


def run(args: argparse.Namespace) -> int:
    from dgg.commands.report import build_report
    from dgg.config import load_config
    from dgg.experiments import EXPERIMENTS, record_experiment, run_arm

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.name not in EXPERIMENTS:
        print(f"dgg bench: error: unknown experiment {args.name!r}; choose one of {', '.join(EXPERIMENTS)}",
              file=sys.stderr)
        return 2
    if args.seeds < 1:
        print("dgg bench: error: --seeds must be >= 1", file=sys.stderr)
        return 2
    seeds = parse_seed_list(args.seed_list) if args.seed_list is not None else list(range(args.seeds))
    if seeds is None:
        print(f"dgg bench: error: --seed-list must be distinct integers >= 0 separated by commas (got "
              f"{args.seed_list!r})", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/bench/{args.name}")
    overrides = list(args.overrides)
    started = time.perf_counter()
    config = load_config(args.config, overrides)
    if config.model.path == "default":
        from dgg.warmstart import warmstart

        overrides.append(f"model.path={warmstart()}")
    arms = EXPERIMENTS[args.name](config)
    selected = select_arms(arms, args.arms)
    if selected is None:
        names = ", ".join(a.name for a in arms)
        print(f"dgg bench: error: --arms {args.arms!r} names an arm {args.name} does not have; "
              f"its arms are: {names}", file=sys.stderr)
        return 2
    record_experiment(out, {
        "name": args.name, "config": str(args.config), "overrides": overrides,
        "arms": [{"name": a.name, "label": a.label, "overrides": list(a.overrides), "baseline": a.baseline}
                 for a in arms]}, seeds)
    total = len(selected) * len(seeds)
    for i, (seed, arm) in enumerate(((s, a) for s in seeds for a in selected), 1):
        print(f"[{i}/{total}] {arm.label}, seed {seed}", flush=True)
        run_arm(args.config, overrides, arm, seed, out, force=args.force)
    build_report(out)
    print(f"report: {out / 'report.md'}  ({time.perf_counter() - started:.0f} s)")
    return 0
