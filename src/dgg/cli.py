"""The `dgg` command line. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only routes."""

from __future__ import annotations

import argparse
import importlib
import sys

from dgg.errors import UserError
from dgg.preemption import RunStopped, stop_signals

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dgg.commands.train", "train a policy with GRPO (single-use, fixed-K or DGG reuse)"),
    "warmstart": ("dgg.commands.warmstart", "build and warm-start the embedded default tiny model"),
    "demo": ("dgg.commands.demo", "single-use vs naive reuse vs DGG on the embedded default, with a report"),
    "bench": ("dgg.commands.bench", "run a named benchmark experiment over seeds"),
    "report": ("dgg.commands.report", "analyse a benchmark directory from its metrics files"),
    "constants": ("dgg.commands.constants", "measure the architectural constants of Theorem 1 (Table 2)"),
    "replay": ("dgg.commands.replay", "where reuse rules (dgg, kl, clip, ...) would have stopped on a run's log"),
    "model": ("dgg.commands.model", "list or fetch the named real models (e.g. smollm2-135m-instruct)"),
}


STOPPABLE = ("train", "demo", "bench")  # SIGTERM/SIGINT: checkpoint, one line, exit 128 + signal (preemption.py)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    from dgg import __version__

    parser = argparse.ArgumentParser(prog="dgg", description="Dynamic Gradient Gating for RLVR.")
    parser.add_argument("--version", action="version", version=f"dgg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, object] = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot put key=value positionals after options (`dgg bench main --seeds 3 optim.lr=1e-3`);
    # such leftovers are overrides, anything else is an error as usual.
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.parse_args(argv)  # reports the unrecognised arguments and exits
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command in STOPPABLE:  # a stop signal during loading or between arms is honoured too
            with stop_signals() as stop:
                code = int(modules[args.command].run(args) or 0)
                if stop.requested and code == 0:  # it came after the last point where a stop could act
                    print(f"dgg {args.command}: {stop.name} came after the work had finished; nothing to resume",
                          file=sys.stderr)
                return code
        return int(modules[args.command].run(args) or 0)
    except RunStopped as stop:  # SIGTERM/SIGINT: the run checkpointed where it stood
        how = f"dgg train --resume {stop.run_dir}" if args.command == "train" else "the same command"
        print(f"dgg {args.command}: {stop}; continue with {how}", file=sys.stderr)
        return stop.exit_code
    except (UserError, OSError) as err:
        # One error path: a user error is one line naming what to fix, exit 2; --debug shows where it arose.
        if args.debug:
            raise
        print(f"dgg {args.command}: error: {describe_error(err)}", file=sys.stderr)
        return 2


def describe_error(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, UserError):
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror or err}{where} (rerun with --debug for the traceback)"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
