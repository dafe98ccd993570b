"""Behaviour-cloning warm start for the alfworld agent: supervised steps on the planner expert's episodes.

SmolLM2-135M-Instruct wins no generated ALFWorld room at any level tried (BENCHMARKS.md), so every GRPO group
has equal rewards and no gradient. The usual remedy in ALFWorld work is imitation first, RL second. This
script plays the expert on rooms drawn from a seed space apart from the RL task's, lays each episode out
exactly as dgg's episode engine does (the chat template's turns, the same observation tokens), and trains on
the expert's reply tokens only, for a few steps, so that the result wins sometimes but not always. The output
is a Hugging Face directory for ``model.path``.

    python benchmarks/alfworld_bc.py --out runs/agents/alfworld_bc
    dgg train -c alfworld_smollm2 model.path=runs/agents/alfworld_bc
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dgg.agents.env import EnvironmentTask
from dgg.agents.episodes import TurnFormat
from dgg.config import load_config
from dgg.errors import UserError
from dgg.loading import load_policy
from dgg.precision import autocast, resolve_precision
from dgg.rollout import render_prompt


def expert_episode(task: EnvironmentTask, tokenizer, turn_format: TurnFormat, index: int) -> tuple[list, list]:
    """(token ids, labels) of the expert's episode on problem ``index``: labels are the ids on the expert's
    replies (each closed by the end-of-turn token, as a sampled reply is) and -100 elsewhere."""
    problem = render_prompt(tokenizer, task.problem("train", index), True)
    env = task.new_environment()
    env.reset(problem.meta["env_seed"])
    ids = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(ids)
    eos = tokenizer.eos_token_id
    for command in env.expert_plan():
        reply = tokenizer(command, add_special_tokens=False)["input_ids"] + [eos]
        ids, labels = ids + reply, labels + reply
        result = env.step(command)
        if result.done:
            break
        observation = turn_format.observation_ids(result.observation, reply_ended=True)
        ids, labels = ids + observation, labels + [-100] * len(observation)
    return ids, labels


def padded(rows: list[tuple[list, list]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    return ids, labels, attention


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="alfworld_smollm2",
                        help="the RL config (a bundled name or a path) whose model, task and precision to use")
    parser.add_argument("--out", required=True, help="directory for the warm-started model (must not exist)")
    parser.add_argument("--episodes", type=int, default=16, help="expert episodes to imitate")
    parser.add_argument("--steps", type=int, default=2, help="two steps taught SmolLM2 the command format and "
                        "left it winning 3 of 32 episodes (BENCHMARKS.md); more would leave RL less to do")
    parser.add_argument("--batch", type=int, default=4, help="episodes per step")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task-seed", type=int, default=1_000_003, help="seed space of the expert's rooms; "
                        "keep it apart from the RL config's task.seed so RL's rooms are not the imitated ones")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the config, as for dgg train")
    args = parser.parse_args(argv)
    try:
        return warm_start(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def warm_start(args) -> int:
    out = Path(args.out)
    if out.exists():
        raise UserError(f"--out {out} exists; choose a new directory (a warm start is never overwritten)")
    if min(args.episodes, args.steps, args.batch) < 1 or args.batch > args.episodes:
        raise UserError("--episodes, --steps and --batch must be positive, and --batch at most --episodes")
    config = load_config(args.config, args.overrides)
    if config.task.name != "alfworld":
        raise UserError(f"--config {args.config}: task.name is {config.task.name!r}; the planner expert is "
                        "alfworld's")
    if args.threads:
        torch.set_num_threads(args.threads)
    task = EnvironmentTask("alfworld", config.task.options, seed=args.task_seed)
    model, tokenizer = load_policy(config.model)
    precision = resolve_precision(config.train.precision, torch.device("cpu"))
    turn_format = TurnFormat(tokenizer, chat=True)
    started = time.perf_counter()
    episodes = [expert_episode(task, tokenizer, turn_format, i) for i in tqdm(range(args.episodes), desc="expert")]
    played = time.perf_counter() - started
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in (bar := tqdm(range(args.steps), desc="imitation")):
        ids, labels, attention = padded(rng.sample(episodes, args.batch), tokenizer.pad_token_id)
        with autocast(ids.device, precision):
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=losses[-1])
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    report = {"config": args.config, "overrides": args.overrides, "task_options": config.task.options,
              "task_seed": args.task_seed, "episodes": args.episodes, "steps": args.steps, "batch": args.batch,
              "lr": args.lr, "precision": precision,
              "expert_reply_tokens_mean": sum(len(lab) - lab.count(-100) for _, lab in episodes) / len(episodes),
              "seconds_playing": round(played, 1), "seconds_total": round(time.perf_counter() - started, 1),
              "losses": losses}
    (partial / "bc_report.json").write_text(json.dumps(report, indent=1))
    partial.rename(out)
    print(f"warm start written to {out}: loss {losses[0]} -> {losses[-1]} in {args.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
