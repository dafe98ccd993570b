"""`dgg train -c configs/NAME.yaml key=value ...` — run the reference GRPO trainer."""

from __future__ import annotations

import argparse
import json
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="YAML config file (defaults apply to anything it leaves out)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. reuse.mode=dgg reuse.tau=0.5 optim.lr=1e-3")
    parser.add_argument("--model", help="shortcut for model.path: a local Hugging Face causal-LM directory, "
                                        "a hub name, or 'default' (the embedded tiny model)")
    parser.add_argument("--output", help="shortcut for output.dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run already in the output directory (default: refuse)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last checkpoint (its config.yaml is used; "
                             "overrides such as train.max_batches=200 still apply)")


def run(args: argparse.Namespace) -> int:
    from dgg.config import ConfigError, load_config
    from dgg.launch import train
    from dgg.run_io import load_run_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.path={args.model}")
    if args.output:
        overrides.append(f"output.dir={args.output}")
    if args.overwrite:
        overrides.append("output.overwrite=true")
    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the run's own config.yaml; drop -c/--config")
        config = load_run_config(args.resume, overrides)
    else:
        config = load_config(args.config, overrides)
    trainer = train(config, resume=args.resume)
    state = trainer.state
    print(json.dumps({"run_dir": str(trainer.run_dir), "batches": state.batch, "rollouts": state.rollouts,
                      "updates": state.updates, "gate_discards": trainer.gate.discards_by_reason,
                      "wall_time_s": round(state.wall_time, 2)}))
    return 0
