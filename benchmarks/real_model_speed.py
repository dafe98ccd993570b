"""Seconds per rollout batch and per update of the reference trainer on a real pretrained LM, and peak memory.

    python benchmarks/real_model_speed.py --model smollm2-135m-instruct [--batches 3] [--set train.precision=bf16]

Runs ``dgg train`` in-process on the given model with fixed reuse (K = 4; every attempt is an applied update)
on one shape: P prompts × G completions, ≤ max_new_tokens, the chain_sum chat task, no evaluation, one
checkpoint at the end (not timed). Reports, from the run's metrics file, the median seconds of a rollout batch
(sampling), of π_old scoring, of one update attempt, the training seconds per batch, and the process's peak
resident memory (``ru_maxrss``; run one configuration per process so that the peak is its own).

Works on any checkout of dgg (only config overrides and the metrics file are used), so the same command
measures the code before and after a change.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a named model, a model directory or a hub name")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--mode", default="fixed", choices=("fixed", "single"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    parser.add_argument("--label", default="", help="a name for this configuration in the output")
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    args = parser.parse_args()

    from dgg.analysis import read_metrics
    from dgg.config import load_config
    from dgg.trainer import GRPOTrainer

    model = args.model
    try:
        from dgg.models import resolve  # absent before named models existed
        model = resolve(model)
    except ImportError:
        pass
    out = tempfile.mkdtemp(prefix="dgg-real-speed-")
    overrides = [f"model.path={model}", "task.name=chain_sum", "task.prompt_format=chat",
                 "task.options={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 2}",
                 f"rollout.prompts_per_batch={args.prompts}", f"rollout.group_size={args.group}",
                 f"rollout.max_new_tokens={args.tokens}", "rollout.temperature=0.7", f"reuse.mode={args.mode}",
                 "reuse.max_reuse=4", "optim.lr=3e-5", f"train.max_batches={args.batches}", "eval.every=0",
                 "profile.weights_every=4", "output.progress=false", f"output.dir={out}", *args.set]
    config = load_config("demo", overrides)
    trainer = GRPOTrainer(config)
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    records = read_metrics(out)
    updates = [r for r in records if r["kind"] == "update"]
    rollouts = [r for r in records if r["kind"] == "rollout"]

    def median(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else None

    result = {
        "label": args.label, "date": time.strftime("%Y-%m-%d"), "model": args.model,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "overrides": args.set, "mode": args.mode, "batches": args.batches,
        "completions_per_batch": args.prompts * args.group, "max_new_tokens": args.tokens,
        "rollout_seconds": median(rollouts, "rollout/seconds"),
        "scoring_seconds": median(rollouts, "rollout/scoring_seconds"),
        "update_seconds": median(updates, "perf/update_seconds"),
        "training_seconds_per_batch": trainer.state.wall_time / args.batches,
        "total_seconds": total,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "reward_mean": statistics.mean(r["reward/mean"] for r in rollouts),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
