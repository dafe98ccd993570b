"""How often a model answers a task before any training, for several prompt formats and temperatures: the
probe that picks a bundled config's task, so that GRPO starts with groups that hold both rewards (the issue's
band: a base accuracy between 0.1 and 0.5).

    python benchmarks/probe_base_accuracy.py --model gemma-3-270m --out benchmarks/results/probe_gemma3_270m.json
    python benchmarks/probe_base_accuracy.py --model gemma-3-270m --variants few-shot --temperatures 0.7 \
        --problems 128 --samples 2 --out benchmarks/results/probe_gemma3_270m_few_shot.json

Each variant samples ``--samples`` completions of the first ``--problems`` held-out problems with dgg's own
sampler and scores them with the task's reward, exactly as the trainer's evaluation at batch 0 does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ONE_DIGIT = "task.options={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}"
TWO_DIGITS = "task.options={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 2}"
VARIANTS = {
    "bare, 1 digit": ["task.prompt_format=bare", ONE_DIGIT],
    "bare, 1-2 digits": ["task.prompt_format=bare", TWO_DIGITS],
    "instruct, 1-2 digits, lenient": ["task.prompt_format=instruct", TWO_DIGITS, "task.answer_parser=lenient",
                                      "task.instruction=Reply with just the number."],
    "bare, 1 digit, 2-shot": ["task.prompt_format=bare", ONE_DIGIT, "task.few_shot=2"],
    "bare, 1 digit, 4-shot": ["task.prompt_format=bare", ONE_DIGIT, "task.few_shot=4"],
    "bare, 1-2 digits, 8-shot": ["task.prompt_format=bare", TWO_DIGITS, "task.few_shot=8"],
}
GROUPS = {"zero-shot": [name for name in VARIANTS if "shot" not in name],
          "few-shot": [name for name in VARIANTS if "shot" in name]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a named model, a directory or a hub name")
    parser.add_argument("--temperatures", default="0.7,1.0")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--variants", default="all",
                        help=f"'all', {', '.join(repr(g) for g in GROUPS)}, or comma-separated names of {list(VARIANTS)}")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    names = list(VARIANTS) if args.variants == "all" else GROUPS.get(args.variants, args.variants.split(","))
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)} or {list(GROUPS)}")

    import torch

    from dgg.config import load_config
    from dgg.evaluation import held_out_accuracy
    from dgg.loading import load_policy
    from dgg.precision import resolve_precision
    from dgg.samplers import HFSampler
    from dgg.tasks import make_task

    base = load_config(None, [f"model.path={args.model}", "task.name=chain_sum", "task.test_size=256",
                              f"eval.problems={args.problems}", f"eval.samples={args.samples}",
                              f"rollout.max_new_tokens={args.max_new_tokens}"])
    model, tokenizer = load_policy(base.model)
    precision = resolve_precision("auto", torch.device("cpu"))
    sampler = HFSampler(model, tokenizer, precision)
    rows = []
    for name in names:
        overrides = VARIANTS[name]
        for temperature in [float(t) for t in args.temperatures.split(",")]:
            config = load_config(None, [f"model.path={args.model}", "task.name=chain_sum", "task.test_size=256",
                                        f"eval.problems={args.problems}", f"eval.samples={args.samples}",
                                        f"eval.temperature={temperature}",
                                        f"rollout.max_new_tokens={args.max_new_tokens}", *overrides])
            task = make_task(config.task)
            started = time.perf_counter()
            accuracy, count = held_out_accuracy(sampler, task, tokenizer, config.task.prompt_format == "chat", config,
                                                seed=0, device=torch.device("cpu"))
            row = {"variant": name, "temperature": temperature, "accuracy": round(accuracy, 4), "problems": count,
                   "samples": args.samples, "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "precision": precision,
                                        "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
