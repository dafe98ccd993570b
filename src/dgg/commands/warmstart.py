"""`dgg warmstart`: build (or reuse) the embedded default model and print its directory."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. steps=500 label_noise=0.5 model.hidden_size=64")
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="warm-start config (default: the built-in default, as in configs/warmstart.yaml)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output directory (default: runs/models/warmstart-<hash>, or under $DGG_CACHE/models)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished directory exists")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads while training (default 1; 2 is faster on an idle 2-core machine)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary, only the directory")


def run(args: argparse.Namespace) -> int:
    from dgg.warmstart import TORCH_THREADS, warmstart
    from dgg.warmstart_config import load_config

    try:
        config = load_config(args.config, args.overrides)
        directory = warmstart(config, out_dir=args.out, progress=not args.quiet, force=args.force,
                              threads=TORCH_THREADS if args.threads is None else args.threads)
    except ValueError as err:
        if getattr(args, "debug", False):
            raise
        print(f"dgg warmstart: {err}", file=sys.stderr)
        return 2
    print(directory)
    return 0
