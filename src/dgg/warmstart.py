"""Warm-start the embedded default model: a tiny Qwen2 taught chain_sum arithmetic by noisy supervision.

RL with verifiable rewards needs a policy that already solves the task sometimes but not always, so that a
GRPO group holds both rewards and the advantages are non-zero (paper §3). A model built from nothing solves
nothing; one trained to convergence on clean labels leaves RL no room. So the default model is trained by
supervised next-token prediction on reasoning-gym ``chain_sum`` problems whose targets are, with probability
``label_noise``, replaced by another problem's answer. The noisy targets spread the model's probability over
plausible wrong answers, so greedy decoding is right more often than sampling at T = 1, and sampled tokens
include a tail with small π_old whose importance ratios inflate under reuse (paper §3, Eq. 2). Within the
default budget it learns most one-digit problems and few two-digit ones (numbers in warmstart_metrics.json).

The prompt is exactly the format the RL task uses (``prompt_format="bare"``): the expression with its spaces
removed followed by ``=``, e.g. ``"57-8="``; the target is the answer followed by the EOS token.

The result is a Hugging Face directory (safetensors) cached under a hash of the config, so ``make demo`` and
every RL experiment start from the same weights without retraining.

The config is read by dgg's own loader (``dgg.config``), problems are the tasks' ``Problem`` and the held-out
check samples with the trainer's sampler (``dgg.rollout``); only the supervised loop is the warm-start's own.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from dgg.tasks import Problem
from dgg.tiny import DEFAULT_CHARACTERS
from dgg.warmstart_config import (
    FORMAT_VERSION,
    WarmstartConfig,
    config_hash,
    config_to_mapping,
    default_model_dir,
    filler_characters,
)

TASK_NAME = "chain_sum"
METRICS_FILENAME = "warmstart_metrics.json"
CONFIG_FILENAME = "warmstart.yaml"
IGNORE_INDEX = -100
# Default torch threads for training. The matmuls are tiny: on an idle 2-core machine two threads were about
# 1.5x faster than one, but with the cores shared by other jobs two threads ran 15x slower (measured), so one.
TORCH_THREADS = 1


# ---------------------------------------------------------------------------------------------- data


def bare_prompt(expression: str) -> str:
    """The RL task's ``prompt_format="bare"``: '57 - 8' -> '57-8='."""
    return expression.replace(" ", "") + "="


def generate_problems(config: WarmstartConfig, seed: int, size: int) -> list[Problem]:
    """``size`` chain_sum problems from reasoning-gym at ``seed`` with the config's difficulty options."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(
        TASK_NAME, seed=seed, size=size, min_terms=config.min_terms, max_terms=config.max_terms,
        min_digits=config.min_digits, max_digits=config.max_digits,
    )
    return [Problem(bare_prompt(item["metadata"]["expression"]), item["answer"], {}) for item in dataset]


def rl_test_problems(config: WarmstartConfig) -> list[Problem]:
    """The RL task's held-out split, exactly as ``dgg.tasks`` builds it for ``task.seed = heldout_seed``."""
    from dgg.tasks import TaskConfig, make_task

    options = {"min_terms": config.min_terms, "max_terms": config.max_terms, "min_digits": config.min_digits,
               "max_digits": config.max_digits}
    task = make_task(TaskConfig(name=TASK_NAME, options=options, prompt_format="bare", seed=config.heldout_seed,
                                test_size=config.heldout_size))
    return [task.problem("test", i) for i in range(config.heldout_size)]


def split_train_heldout(config: WarmstartConfig) -> tuple[list[Problem], list[Problem], float]:
    """(training pool without held-out prompts, held-out problems, fraction of held-out prompts the raw pool had)."""
    heldout = rl_test_problems(config)
    pool = generate_problems(config, config.train_seed, config.num_train_problems)
    heldout_prompts = {p.prompt for p in heldout}
    pool_prompts = {p.prompt for p in pool}
    overlap = sum(p.prompt in pool_prompts for p in heldout) / len(heldout)
    train = [p for p in pool if p.prompt not in heldout_prompts]
    if not train:
        raise ValueError("warmstart config: every training problem is held out; raise num_train_problems")
    return train, heldout, overlap


def _encode_pool(problems: Sequence[Problem], tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt, and of each answer followed by EOS (no BOS: the RL task adds none)."""
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    answers = tokenizer([p.answer for p in problems], add_special_tokens=False)["input_ids"]
    return prompts, [ids + [tokenizer.eos_token_id] for ids in answers]


def build_batch(prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]], pad_token_id: int):
    """Right-padded (input_ids, attention_mask, labels), labels = IGNORE_INDEX except on target tokens.

    Right padding keeps every sequence's positions starting at 0, as left-padded generation does when it
    derives position ids from the attention mask.
    """
    import torch

    rows = [list(p) + list(t) for p, t in zip(prompt_ids, target_ids, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, row) in enumerate(zip(prompt_ids, rows, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, len(p) : len(row)] = input_ids[i, len(p) : len(row)]
    return input_ids, attention_mask, labels


def target_token_loss(logits, labels):
    """Mean cross-entropy of the next-token prediction over target tokens only. logits (B, T, V), labels (B, T)."""
    import torch.nn.functional as F

    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def zipf_weights(count: int):
    """Zipf's law over ``count`` ranks: weight of rank k (1-based) ∝ 1/k, normalised to sum to 1."""
    import torch

    weights = 1.0 / torch.arange(1, count + 1, dtype=torch.float64)
    return weights / weights.sum()


def with_filler_targets(targets: Sequence[Sequence[int]], fraction: float, filler_ids: Sequence[int], weights,
                        eos_token_id: int, generator) -> list[list[int]]:
    """Each target replaced, with probability ``fraction``, by [one Zipf-drawn filler token, EOS]."""
    import torch

    replace = (torch.rand(len(targets), generator=generator) < fraction).tolist()
    drawn = torch.multinomial(weights, len(targets), replacement=True, generator=generator).tolist()
    return [[filler_ids[d], eos_token_id] if r else list(t) for t, r, d in zip(targets, replace, drawn, strict=True)]


def learning_rate_at(step: int, config: WarmstartConfig) -> float:
    """Linear warm-up to ``learning_rate``, then a cosine down to 10 % of it at the last step."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------- the check


def evaluate_accuracy(model, tokenizer, problems: Sequence[Problem], temperature: float, max_new_tokens: int,
                      n_samples: int = 1, seed: int = 0) -> dict[str, float]:
    """Exact-match accuracy of ``n_samples`` completions per problem (temperature 0: greedy),
    sampled as the trainer samples (:func:`dgg.rollout.sample_rollouts`, full softmax), with token statistics.

    Returns ``accuracy``, ``mean_chosen_probability`` (mean π of the generated tokens, EOS included, under the
    untempered policy: π_old at T = 1), ``fraction_chosen_below_0.05`` (share of generated tokens with
    π < 0.05, the tail whose importance ratios inflate under reuse) and ``mean_completion_tokens``.
    """
    import torch

    from dgg.rollout import sample_rollouts, score_old_policy

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        batch = sample_rollouts(model, tokenizer, list(problems), n_samples, max_new_tokens, temperature)
    score_old_policy(model, batch, 1.0)
    probabilities = batch.old_logprobs.exp()[batch.completion_mask > 0]
    correct = sum(c.strip() == p.answer for c, p in zip(batch.completions, batch.problems, strict=True))
    return {
        "accuracy": correct / batch.size,
        "mean_chosen_probability": float(probabilities.mean()),
        "fraction_chosen_below_0.05": float((probabilities < 0.05).float().mean()),
        "mean_completion_tokens": probabilities.numel() / batch.size,
    }


# ---------------------------------------------------------------------------------------------- training


def _train(config: WarmstartConfig, train: Sequence[Problem], progress: bool):
    """Supervised training on noisy targets; returns (model, tokenizer, loss_history)."""
    import torch
    from tqdm.auto import tqdm

    from dgg.tiny import build_char_tokenizer, build_tiny_model

    fillers = filler_characters(config.filler_tokens)
    tokenizer = build_char_tokenizer(DEFAULT_CHARACTERS + fillers) if fillers else build_char_tokenizer()
    model = build_tiny_model(tokenizer, config.model, seed=config.seed)
    model.train()
    prompt_ids, target_ids = _encode_pool(train, tokenizer)
    generator = torch.Generator().manual_seed(config.seed)
    filler_ids = tokenizer.convert_tokens_to_ids(list(fillers)) if fillers else []
    filler_weights = zipf_weights(len(filler_ids)) if fillers else None
    filler_generator = torch.Generator().manual_seed(config.seed + 1)  # own stream: the default's draws stay put
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98))
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="warmstart", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        problem_index = torch.randint(len(train), (config.batch_size,), generator=generator)
        noisy = torch.rand(config.batch_size, generator=generator) < config.label_noise
        donor_index = torch.randint(len(train), (config.batch_size,), generator=generator)
        target_index = torch.where(noisy, donor_index, problem_index).tolist()
        targets = [target_ids[i] for i in target_index]
        if config.filler_noise > 0:
            targets = with_filler_targets(targets, config.filler_noise, filler_ids, filler_weights,
                                          tokenizer.eos_token_id, filler_generator)
        input_ids, _, labels = build_batch(
            [prompt_ids[i] for i in problem_index.tolist()], targets, tokenizer.pad_token_id,
        )
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        # No attention mask needed: with right padding and causal attention no real token sees a pad.
        logits = model(input_ids=input_ids).logits  # (B, T, V)
        loss = target_token_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 25 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / len(losses[-25:]):.3f}", lr=f"{group['lr']:.1e}")
    model.eval()
    return model, tokenizer, losses


def _is_finished(directory: Path) -> bool:
    return (directory / METRICS_FILENAME).is_file() and (directory / CONFIG_FILENAME).is_file()


def _recorded_hash(directory: Path) -> str | None:
    try:
        return json.loads((directory / METRICS_FILENAME).read_text()).get("config_hash")
    except (OSError, ValueError):
        return None


def warmstart(config: WarmstartConfig | None = None, out_dir: str | Path | None = None, progress: bool = True,
              force: bool = False, threads: int = TORCH_THREADS) -> Path:
    """Build (or reuse) the warm-started model directory and return its path.

    A finished directory for the same config hash is reused at once; ``force`` rebuilds it. A directory that
    holds a different config is an error unless ``force``. The model is written to a temporary sibling and
    renamed into place last, so an interrupted run never leaves a directory that looks finished.
    ``threads`` is torch's intra-op thread count while training; it is not part of the cache key (1 and 2
    threads gave bit-identical weights here).
    """
    import torch

    if threads < 1:
        raise ValueError(f"warmstart: threads must be a positive integer, got {threads!r}")
    config = config or WarmstartConfig()
    digest = config_hash(config)
    target = Path(out_dir) if out_dir is not None else default_model_dir(config)
    if target.exists() and not force:
        if _is_finished(target) and _recorded_hash(target) == digest:
            return target
        raise ValueError(f"warmstart output {str(target)!r} exists and does not hold this config "
                         f"(hash {digest}); pass force=True / --force to replace it or choose another --out")

    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train, heldout, overlap = split_train_heldout(config)
        model, tokenizer, losses = _train(config, train, progress)
        train_seconds = time.perf_counter() - started
        sampled = evaluate_accuracy(model, tokenizer, heldout, config.eval_temperature, config.eval_max_new_tokens,
                                    n_samples=config.eval_samples, seed=config.seed)
        greedy = evaluate_accuracy(model, tokenizer, heldout, 0.0, config.eval_max_new_tokens)
    finally:
        torch.set_num_threads(previous_threads)
    tail = losses[-min(100, len(losses)):]
    metrics = {
        "config_hash": digest,
        "format_version": FORMAT_VERSION,
        "final_loss": sum(tail) / len(tail),
        "loss_every_100_steps": losses[::100],
        "train_problems": len(train),
        "heldout_problems": len(heldout),
        "heldout_overlap_before_exclusion": overlap,
        "heldout_sampled_accuracy": sampled["accuracy"],
        "heldout_greedy_accuracy": greedy["accuracy"],
        "sampled_mean_chosen_probability": sampled["mean_chosen_probability"],
        "sampled_fraction_chosen_below_0.05": sampled["fraction_chosen_below_0.05"],
        "sampled_mean_completion_tokens": sampled["mean_completion_tokens"],
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - started,
        "torch_threads": threads,
    }

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / CONFIG_FILENAME).write_text(
            f"# dgg warmstart config (format {FORMAT_VERSION}, hash {digest})\n"
            + yaml.safe_dump(config_to_mapping(config), sort_keys=False)
        )
        (staging / METRICS_FILENAME).write_text(json.dumps(metrics, indent=2) + "\n")
        if target.exists():  # force: move the old one aside only once the new one is complete
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / "dir")
            shutil.rmtree(retired, ignore_errors=True)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if progress:
        print(f"warmstart: loss {metrics['final_loss']:.3f}, held-out accuracy sampled (T={config.eval_temperature}) "
              f"{sampled['accuracy']:.3f}, greedy {greedy['accuracy']:.3f}, {metrics['total_seconds']:.0f} s")
    return target
