"""GRPO with Dynamic Gradient Gating in Hugging Face TRL: the usual TRL script, two names changed.

    python examples/trl_grpo_dgg.py                      # tiny random model, CPU, well under a minute
    python examples/trl_grpo_dgg.py --model PATH         # any causal LM directory or hub id you have locally

Compared with a stock TRL GRPO script, the only changes are the import line and the two class names
(``GRPOConfig`` -> ``DGGGRPOConfig``, ``GRPOTrainer`` -> ``DGGGRPOTrainer``); ``gate/*`` and
``actor/lm_head_grad_energy`` then appear next to TRL's own metrics (and in TensorBoard / W&B / trackio with
``--report-to``).
"""

from __future__ import annotations

import argparse
import random
import re
import tempfile

from datasets import Dataset
from transformers import AutoTokenizer

from dgg.integrations.trl import DGGGRPOConfig, DGGGRPOTrainer  # was: from trl import GRPOConfig, GRPOTrainer


def addition_dataset(size: int, seed: int) -> Dataset:
    """Prompts "a+b=" with the answer kept in a column, which TRL hands to the reward function."""
    rng = random.Random(seed)
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(size)]
    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]})


def correct_sum_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1 for the right number at the start of the completion, 0.1 for any number, else 0."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        match = re.match(r"\s*(\d+)", completion)
        rewards.append(1.0 if match and match.group(1) == expected else 0.1 if match else 0.0)
    return rewards


def build_default_model(directory: str) -> str:
    from dgg.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer()
    build_tiny_model(tokenizer, TinyModelConfig(hidden_size=64, intermediate_size=128), seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or id; default: a tiny random model built in a temp dir")
    parser.add_argument("--output-dir", default=None, help="where TRL writes checkpoints (default: a temp dir)")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--num-iterations", type=int, default=4, help="K: passes over each generation batch")
    parser.add_argument("--tau", type=float, default=0.5, help="DGG threshold tau of Eq. 8 (inf disables gating)")
    parser.add_argument("--window", type=int, default=20, help="DGG window W")
    parser.add_argument("--report-to", default="none", help="tensorboard, wandb, trackio, ... (default: none)")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model = args.model
    if model is None:
        model = build_default_model(tempfile.mkdtemp(prefix="dgg-tiny-"))
        print(f"No --model given: built a tiny random model in {model}. (The embedded warm-started default "
              "model comes from `dgg warmstart`; pass its directory with --model.)")
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="dgg-trl-")

    config = DGGGRPOConfig(  # was: GRPOConfig
        output_dir=output_dir,
        num_iterations=args.num_iterations,
        num_generations=8,
        per_device_train_batch_size=16,
        max_completion_length=4,
        temperature=1.0,
        learning_rate=3e-3,
        max_steps=args.max_steps,
        logging_steps=20,
        save_strategy="no",
        report_to=[] if args.report_to == "none" else [args.report_to],
        use_cpu=args.cpu,
        bf16=False,
        seed=0,
        dgg_tau=args.tau,
        dgg_window=args.window,
    )
    trainer = DGGGRPOTrainer(  # was: GRPOTrainer
        model=model,
        reward_funcs=correct_sum_reward,
        args=config,
        train_dataset=addition_dataset(512, seed=0),
        processing_class=AutoTokenizer.from_pretrained(model),
    )
    trainer.train()
    gate = trainer.dgg_gate
    if gate is not None:
        print(f"gate: {gate.discards} of {gate.observations} optimizer steps discarded ({gate.discards_by_reason})")


if __name__ == "__main__":
    main()
