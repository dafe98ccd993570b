"""Wall-clock overhead of DGG inside TRL: stock ``GRPOTrainer`` vs ``DGGGRPOTrainer``, same model/task/seed.

    PYTHONPATH=src python benchmarks/trl_overhead.py [--steps 200] [--num-iterations 4] [--repeats 3]

Runs the same tiny-model GRPO job (the addition task of examples/trl_grpo_dgg.py, CPU) with
(a) trl.GRPOTrainer, (b) DGGGRPOTrainer with gating on (tau=0.5), (c) DGGGRPOTrainer with tau=inf (probe
and gate run, never discard: the pure bookkeeping cost) and (d) watch mode with every rule combined (all the
signals any rule reads, per step, logged; nothing dropped), interleaved ``--repeats`` times, and prints a
Markdown table of ``train()`` wall-clock (median over repeats) plus the time spent inside the gate itself.
A discard shortens a batch's reuse and forces an extra generation, so (b) can also differ from (a) for
that reason; the discard count is shown.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from trl_grpo_dgg import addition_dataset, build_default_model, correct_sum_reward  # noqa: E402

from dgg.integrations.trl import DGGGRPOConfig, DGGGRPOTrainer  # noqa: E402


class TimedDGGGRPOTrainer(DGGGRPOTrainer):
    """Accumulates the seconds spent in the gate (energy read, z-test, discard bookkeeping, logging)."""

    gate_seconds = 0.0

    def _gate_optimizer_step(self, model):
        start = time.perf_counter()
        super()._gate_optimizer_step(model)
        self.gate_seconds += time.perf_counter() - start


def run(trainer_class, config_class, model_dir: str, steps: int, num_iterations: int, **dgg) -> dict:
    config = config_class(
        output_dir=tempfile.mkdtemp(prefix="dgg-bench-"), num_iterations=num_iterations, num_generations=8,
        per_device_train_batch_size=16, max_completion_length=4, learning_rate=3e-3, max_steps=steps,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0,
        disable_tqdm=True, **dgg,
    )
    trainer = trainer_class(model=model_dir, reward_funcs=correct_sum_reward, args=config,
                            train_dataset=addition_dataset(4096, seed=0),
                            processing_class=AutoTokenizer.from_pretrained(model_dir))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    rule = getattr(trainer, "dgg_rule", None)  # stops of any rule (none in watch mode, which only logs them)
    return {"seconds": seconds, "gate_seconds": getattr(trainer, "gate_seconds", 0.0),
            "discards": sum(rule.stops_by_reason.values()) if rule is not None else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--num-iterations", type=int, default=4, help="K, as in the paper")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = build_default_model(tempfile.mkdtemp(prefix="dgg-tiny-"))

    variants = {
        "trl.GRPOTrainer": (GRPOTrainer, GRPOConfig, {}),
        "DGGGRPOTrainer, tau=0.5": (TimedDGGGRPOTrainer, DGGGRPOConfig, {"dgg_tau": 0.5}),
        "DGGGRPOTrainer, tau=inf": (TimedDGGGRPOTrainer, DGGGRPOConfig, {"dgg_tau": math.inf}),
        "DGGGRPOTrainer, watch mode, every rule": (TimedDGGGRPOTrainer, DGGGRPOConfig, {
            "dgg_watch_only": True, "dgg_rule": "dgg+kl+clip+m2+nosignal+gradnorm"}),
    }
    results = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (trainer_class, config_class, dgg) in variants.items():
            results[name].append(run(trainer_class, config_class, model_dir, args.steps, args.num_iterations, **dgg))

    baseline = statistics.median(r["seconds"] for r in results["trl.GRPOTrainer"])
    print(f"\nTiny Qwen2 (hidden 64, 2 layers), addition task, K={args.num_iterations}, {args.steps} steps, "
          f"16 completions/step, CPU ({platform.processor() or platform.machine()}, torch threads "
          f"{args.threads}), median of {args.repeats} interleaved runs.\n")
    print("| trainer | train() s (median) | min–max s | vs stock | gate s (median) | gate ms / step | discards |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        gate_seconds = statistics.median(r["gate_seconds"] for r in runs)
        discards = "/".join(str(r["discards"]) for r in runs) if name != "trl.GRPOTrainer" else "-"
        spread = f"{min(r['seconds'] for r in runs):.2f}–{max(r['seconds'] for r in runs):.2f}"
        print(f"| {name} | {seconds:.2f} | {spread} | {100 * (seconds / baseline - 1):+.1f}% | {gate_seconds:.3f} | "
              f"{1000 * gate_seconds / args.steps:.3f} | {discards} |")


if __name__ == "__main__":
    main()
