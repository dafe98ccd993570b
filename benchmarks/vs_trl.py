"""Throughput of dgg's reference trainer against TRL's GRPOTrainer on identical work, in the same run.

    python benchmarks/vs_trl.py [--model DIR|NAME] [--batches 20] [--repeats 3] [--threads 2] [--precision bf16]
                                [--few-shot K]

Same model (default: the embedded default from `dgg warmstart`; a named model such as smollm2-135m-instruct
is fetched), same task (chain_sum: bare prompts for a model without a chat template, else the chat template
with "Reply with just the number."; ``--few-shot K`` puts K solved examples before each bare prompt on both
sides, as the bundled Gemma config does), same batch shape (P prompts × G completions, ≤ max_new_tokens,
temperature 1.0), single-use GRPO (one update per generation batch), the same number of updates, no
evaluation, no checkpoints. Both trainers get the same precision (``--precision bf16``: dgg's
``train.precision=bf16``, TRL's ``bf16=True``) and TRL its fastest setting otherwise (gradient checkpointing
off, which TRL turns on by default; ``--trl-gradient-checkpointing`` puts it back). Reports completions/s and
updates/s of each, median over interleaved repeats, and the ratio dgg / TRL (> 1 means dgg is faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time

import torch

INSTRUCTION = "Reply with just the number."


def has_chat_template(model_dir: str) -> bool:
    from dgg.tiny import load_tokenizer

    return bool(getattr(load_tokenizer(model_dir), "chat_template", None))


def run_dgg(model_dir: str, prompts: int, group: int, tokens: int, batches: int, precision: str,
            trl_checkpointing: bool, lr: float, logprob_chunk: int = 0, few_shot: int = 0) -> dict:
    from dgg.config import load_config
    from dgg.trainer import GRPOTrainer

    chat = has_chat_template(model_dir)
    task = ["task.prompt_format=chat", f"task.instruction={INSTRUCTION}", "task.answer_parser=lenient"] if chat \
        else ["task.prompt_format=bare", f"task.few_shot={few_shot}"]
    config = load_config("demo", [f"model.path={model_dir}", f"rollout.prompts_per_batch={prompts}",
                                  f"rollout.group_size={group}", f"rollout.max_new_tokens={tokens}",
                                  f"train.max_batches={batches}", "reuse.mode=single", "eval.every=0",
                                  "profile.weights_every=0", "output.progress=false", "train.threads=null",
                                  f"train.precision={precision}", f"optim.lr={lr}", *task,
                                  f"train.logprob_chunk={logprob_chunk}",
                                  *(["profile.theorem2=false"] if logprob_chunk else []),
                                  f"output.dir={tempfile.mkdtemp(prefix='dgg-vs-trl-')}"])
    trainer = GRPOTrainer(config)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "completions": trainer.state.rollouts, "updates": trainer.state.updates}


def run_trl(model_dir: str, prompts: int, group: int, tokens: int, batches: int, precision: str,
            trl_checkpointing: bool, lr: float, logprob_chunk: int = 0, few_shot: int = 0) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from dgg.rollout import leading_bos
    from dgg.tasks import TaskConfig, make_task

    chat = has_chat_template(model_dir)
    options = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
    task = make_task(TaskConfig(name="chain_sum", options=options, prompt_format="instruct" if chat else "bare",
                                instruction=INSTRUCTION, answer_parser="lenient", few_shot=0 if chat else few_shot))
    rows = [task.problem("train", i) for i in range(prompts * batches)]
    # Bare prompts start with the BOS the tokenizer would add, as dgg's render_prompt gives them (Gemma needs it).
    bos = leading_bos(AutoTokenizer.from_pretrained(model_dir)) or ""
    prompts_column = [[{"role": "user", "content": p.prompt}] for p in rows] if chat else [bos + p.prompt for p in rows]
    dataset = Dataset.from_dict({"prompt": prompts_column, "answer": [p.answer for p in rows]})

    def reward(completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [task.reward(c, a)[0] for c, a in zip(texts, answer)]

    config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-vs-dgg-"), per_device_train_batch_size=prompts * group,
                        num_generations=group, max_completion_length=tokens, num_iterations=1, max_steps=batches,
                        learning_rate=lr, temperature=1.0, use_cpu=True, bf16=precision == "bf16", report_to=[],
                        gradient_checkpointing=trl_checkpointing,
                        save_strategy="no", logging_steps=batches, disable_tqdm=True, seed=0, shuffle_dataset=False)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "completions": prompts * group * batches, "updates": trainer.state.global_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the embedded default, built if needed)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=6)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--lr", type=float, default=5e-4, help="the same learning rate for both (default: the demo's)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="keep TRL's default gradient checkpointing (slower; saves memory)")
    parser.add_argument("--logprob-chunk", type=int, default=0,
                        help="dgg's train.logprob_chunk (0: full logits, as TRL computes them)")
    parser.add_argument("--few-shot", type=int, default=0,
                        help="solved examples before each bare prompt, on both sides (the bundled Gemma config: 8)")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model
    if model_dir is None:
        from dgg.warmstart import WarmstartConfig, warmstart

        model_dir = str(warmstart(WarmstartConfig()))
    else:
        from dgg.models import resolve

        model_dir = resolve(model_dir)
    shape = (model_dir, args.prompts, args.group, args.tokens, args.batches, args.precision,
             args.trl_gradient_checkpointing, args.lr, args.logprob_chunk, args.few_shot)
    results = {"dgg": [], "trl": []}
    for _ in range(args.repeats):
        results["dgg"].append(run_dgg(*shape))
        results["trl"].append(run_trl(*shape))

    def rate(name, key):
        return statistics.median(r[key] / r["seconds"] for r in results[name])

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"work: {args.batches} batches × {args.prompts} prompts × {args.group} completions, ≤ {args.tokens} "
          f"tokens, single-use, {args.precision}, dgg's logprob_chunk {args.logprob_chunk}, "
          f"{args.few_shot} solved examples per prompt; median of "
          f"{args.repeats} interleaved repeats\n")
    print("| trainer | completions/s | updates/s | seconds (median) |")
    print("|---|---|---|---|")
    for name, label in (("dgg", "dgg reference trainer"), ("trl", "trl.GRPOTrainer")):
        print(f"| {label} | {rate(name, 'completions'):.1f} | {rate(name, 'updates'):.2f} | "
              f"{statistics.median(r['seconds'] for r in results[name]):.1f} |")
    print(f"\nratio dgg / TRL (completions/s): {rate('dgg', 'completions') / rate('trl', 'completions'):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "machine": platform.processor() or platform.machine(),
                       "date": time.strftime("%Y-%m-%d"), **results}, f, indent=2)


if __name__ == "__main__":
    main()
