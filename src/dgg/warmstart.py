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

Over 450 lines: the warm-start is one self-contained recipe (its config, its noisy-label data, its own
training loop and the greedy check that the result solves the task sometimes but not always). Nothing else in
dgg uses its pieces, so they stay together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dgg.tiny import DEFAULT_CHARACTERS, TinyModelConfig

# Bump when the training recipe changes in a way the config does not capture, so old caches are not reused.
FORMAT_VERSION = 1
TASK_NAME = "chain_sum"
METRICS_FILENAME = "warmstart_metrics.json"
CONFIG_FILENAME = "warmstart.yaml"
IGNORE_INDEX = -100
# Default torch threads for training. The matmuls are tiny: on an idle 2-core machine two threads were about
# 1.5x faster than one, but with the cores shared by other jobs two threads ran 15x slower (measured), so one.
TORCH_THREADS = 1


@dataclass(frozen=True)
class WarmstartConfig:
    """Everything that determines the warm-started weights (and hence the cache key)."""

    seed: int = 0
    """Seed of the model initialisation, the batch order, the label noise and the evaluation samples."""
    train_seed: int = 1_000_000
    """reasoning-gym seed of the training pool. Item i of a seed-s dataset is drawn from Random(s + i), so the
    pool is the seed range [train_seed, train_seed + num_train_problems), which must not meet the held-out
    range; problems whose expression also occurs in the held-out set are dropped from the pool anyway."""
    num_train_problems: int = 50_000
    """Size of the generated training pool (duplicates included; chain_sum with 2 terms of 1–2 digits has
    about 16k distinct problems). Batches are drawn from it with replacement."""
    min_terms: int = 2
    """chain_sum option: fewest operands per expression."""
    max_terms: int = 2
    """chain_sum option: most operands per expression."""
    min_digits: int = 1
    """chain_sum option: fewest digits per operand."""
    max_digits: int = 2
    """chain_sum option: most digits per operand."""
    heldout_seed: int = 0
    """``task.seed`` of the RL task whose test split is held out (``dgg.tasks``, chain_sum with the options
    above; the demo uses 0). Those problems are excluded from training by expression and give the final
    accuracy report, so RL evaluation never sees a problem the warm-start trained on."""
    heldout_size: int = 256
    """Number of held-out problems: the RL task's ``test_size`` (its first ``heldout_size`` test problems)."""
    label_noise: float = 0.6
    """Fraction of training targets replaced by the answer of another, randomly drawn problem (redrawn every
    time a problem is drawn), so the model starts imperfect and RL has room to improve it."""
    steps: int = 1500
    """Optimizer steps."""
    batch_size: int = 128
    """Problems per optimizer step."""
    learning_rate: float = 1.5e-3
    """Peak AdamW learning rate, reached after the warm-up and decayed by a cosine to 10 % of itself."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip per step; 0 disables clipping."""
    eval_temperature: float = 1.0
    """Sampling temperature of the held-out 'sampled' accuracy (the temperature RL samples at)."""
    eval_max_new_tokens: int = 6
    """Most tokens generated per held-out problem (the RL task's completion budget)."""
    eval_samples: int = 4
    """Samples per held-out problem for the sampled accuracy (greedy uses one)."""
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the tiny Qwen2 model (see :class:`dgg.tiny.TinyModelConfig`)."""
    filler_tokens: int = 0
    """Extra one-character tokens (CJK code points from U+4E00) appended to the vocabulary, a stand-in for the
    long tail of a large LLM vocabulary. 0 (default) keeps the 80-token character vocabulary."""
    filler_noise: float = 0.0
    """Fraction of training targets replaced by one filler token (then EOS), drawn with Zipf's law (rank k with
    probability ∝ 1/k): the model learns to put this much mass on the filler tokens, spread over a long tail of
    tiny probabilities, so that sampled completions include tail tokens with small π_old (paper §3). Needs
    filler_tokens > 0."""

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):  # built from YAML / key=value overrides
            object.__setattr__(self, "model", _tiny_model_config_from_mapping(self.model))
        _validate(self)


def _check(condition: bool, name: str, allowed: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"warmstart config: {name} must be {allowed}, got {value!r}")


def _validate(config: WarmstartConfig) -> None:
    for name in ("seed", "train_seed", "heldout_seed"):
        _check(getattr(config, name) >= 0, name, "a non-negative integer", getattr(config, name))
    for name in ("num_train_problems", "heldout_size", "steps", "batch_size", "eval_max_new_tokens", "eval_samples"):
        _check(getattr(config, name) >= 1, name, "a positive integer", getattr(config, name))
    _check(1 <= config.min_terms <= config.max_terms, "min_terms/max_terms", "1 <= min_terms <= max_terms",
           (config.min_terms, config.max_terms))
    _check(1 <= config.min_digits <= config.max_digits, "min_digits/max_digits", "1 <= min_digits <= max_digits",
           (config.min_digits, config.max_digits))
    _check(0.0 <= config.label_noise < 1.0, "label_noise", "in [0, 1)", config.label_noise)
    _check(config.learning_rate > 0 and math.isfinite(config.learning_rate), "learning_rate", "positive",
           config.learning_rate)
    _check(0 <= config.warmup_steps < config.steps, "warmup_steps", "in [0, steps)", config.warmup_steps)
    _check(config.filler_tokens >= 0, "filler_tokens", "a non-negative integer", config.filler_tokens)
    _check(0.0 <= config.filler_noise < 1.0, "filler_noise", "in [0, 1)", config.filler_noise)
    _check(config.filler_noise == 0.0 or config.filler_tokens > 0, "filler_noise",
           "0 unless filler_tokens > 0", config.filler_noise)
    _check(config.weight_decay >= 0, "weight_decay", "non-negative", config.weight_decay)
    _check(config.max_grad_norm >= 0, "max_grad_norm", "non-negative (0 disables clipping)", config.max_grad_norm)
    _check(config.eval_temperature >= 0, "eval_temperature", "non-negative (0 is greedy)", config.eval_temperature)
    longest_prompt = config.max_terms * (config.max_digits + 1)  # operands, operators and '='
    longest_answer = config.max_digits + math.ceil(math.log10(config.max_terms)) + 2  # sign, carry digits, EOS
    _check(longest_prompt + longest_answer <= config.model.max_position_embeddings, "model.max_position_embeddings",
           f">= {longest_prompt + longest_answer} for these chain_sum options", config.model.max_position_embeddings)


def _tiny_model_config_from_mapping(values: Mapping[str, Any]) -> TinyModelConfig:
    known = {f.name for f in dataclasses.fields(TinyModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"warmstart config: unknown model field(s) {unknown}; valid: {sorted(known)}")
    return TinyModelConfig(**{k: _coerce(f"model.{k}", v, TinyModelConfig, k) for k, v in values.items()})


def _coerce(name: str, value: Any, cls: type, field_name: str) -> Any:
    """Cast a YAML/CLI value to the field's declared type, naming the field when it cannot be."""
    declared = {f.name: f.type for f in dataclasses.fields(cls)}[field_name]
    kind = {"int": int, "float": float, "bool": bool}.get(declared if isinstance(declared, str) else declared.__name__)
    if kind is None:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"warmstart config: {name} must be true or false, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"warmstart config: {name} must be a number ({kind.__name__}), got {value!r}")
    if kind is int and value != int(value):
        raise ValueError(f"warmstart config: {name} must be an integer, got {value!r}")
    return kind(value)


def config_from_mapping(values: Mapping[str, Any]) -> WarmstartConfig:
    """A config from a (YAML) mapping; unknown keys are an error that lists the valid ones."""
    if not isinstance(values, Mapping):
        raise ValueError(f"warmstart config: expected a mapping of field: value, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(WarmstartConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"warmstart config: unknown field(s) {unknown}; valid: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key == "model":
            if not isinstance(value, Mapping):
                raise ValueError(f"warmstart config: model must be a mapping of TinyModelConfig fields, got {value!r}")
            kwargs[key] = _tiny_model_config_from_mapping(value)
        else:
            kwargs[key] = _coerce(key, value, WarmstartConfig, key)
    return WarmstartConfig(**kwargs)


def config_to_mapping(config: WarmstartConfig) -> dict[str, Any]:
    """Plain nested dict of the config (what ``warmstart.yaml`` holds)."""
    return dataclasses.asdict(config)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> WarmstartConfig:
    """The config of a YAML file (defaults if ``path`` is None) with ``key=value`` overrides applied.

    Overrides use dotted keys for the model (``model.hidden_size=64``); values are parsed as YAML scalars.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"warmstart config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"warmstart config file {str(path)!r} must hold a mapping of field: value")
        values = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in loaded.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"warmstart override {item!r} must look like key=value (e.g. steps=500)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"warmstart override {key}: the value is not valid YAML "
                             f"({str(err).splitlines()[0]})") from err
        if key.startswith("model."):
            values.setdefault("model", {})[key.removeprefix("model.")] = value
        else:
            values[key] = value
    return config_from_mapping(values)


# Fields added after the first release: left out of the hash at their defaults so that cached models keep their key.
_HASHED_ONLY_WHEN_SET = {"filler_tokens": 0, "filler_noise": 0.0}
FILLER_START = 0x4E00  # first CJK unified ideograph: none of them occurs in chain_sum prompts or answers


def filler_characters(count: int) -> str:
    """The ``count`` filler characters of ``filler_tokens``, most frequent (Zipf rank 1) first."""
    return "".join(chr(FILLER_START + i) for i in range(count))


def config_hash(config: WarmstartConfig) -> str:
    """12 hex digits identifying the weights: the config, the tokenizer's characters and FORMAT_VERSION."""
    mapping = config_to_mapping(config)
    for name, default in _HASHED_ONLY_WHEN_SET.items():
        if mapping[name] == default:
            del mapping[name]
    payload = {"format_version": FORMAT_VERSION, "characters": DEFAULT_CHARACTERS, "config": mapping}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def default_model_dir(config: WarmstartConfig) -> Path:
    """``$DGG_CACHE/models/warmstart-<hash12>`` if ``DGG_CACHE`` is set, else ``runs/models/warmstart-<hash12>``
    relative to the working directory."""
    root = Path(os.environ["DGG_CACHE"]) / "models" if os.environ.get("DGG_CACHE") else Path("runs") / "models"
    return root / f"warmstart-{config_hash(config)}"


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Problem:
    """One chain_sum problem in the RL task's bare format."""

    prompt: str
    """The expression without spaces followed by '=', e.g. '57-8='."""
    answer: str
    """The exact answer, e.g. '49'."""


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
    return [Problem(bare_prompt(item["metadata"]["expression"]), item["answer"]) for item in dataset]


def rl_test_problems(config: WarmstartConfig) -> list[Problem]:
    """The RL task's held-out split, exactly as ``dgg.tasks`` builds it for ``task.seed = heldout_seed``."""
    from dgg.tasks import TaskConfig, make_task

    options = {"min_terms": config.min_terms, "max_terms": config.max_terms, "min_digits": config.min_digits,
               "max_digits": config.max_digits}
    task = make_task(TaskConfig(name=TASK_NAME, options=options, prompt_format="bare", seed=config.heldout_seed,
                                test_size=config.heldout_size))
    return [Problem(p.prompt, p.answer) for p in (task.problem("test", i) for i in range(config.heldout_size))]


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


# ---------------------------------------------------------------------------------------------- sampling


def sample_completions(model, tokenizer, prompts: Sequence[str], temperature: float, max_new_tokens: int, generator):
    """Sample completions token by token (temperature 0 = greedy) from the full softmax, no top-k/top-p.

    Returns (completions, chosen_probabilities): the decoded text up to EOS, and for every generated token
    (EOS included) its probability under the untempered policy π(·|prefix) — π_old at T = 1.
    Written out rather than via ``generate`` so sampling and the reported probabilities are the same
    distribution (``generate`` applies top_k=50 unless told otherwise).
    """
    import torch

    encoded = tokenizer(list(prompts), add_special_tokens=False, padding=True, return_tensors="pt")
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]  # (B, T), left-padded
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    generated: list[list[int]] = [[] for _ in prompts]
    chosen_probabilities: list[float] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, -1]
            probabilities = torch.softmax(logits.float(), dim=-1)  # (B, V)
            if temperature == 0:
                next_ids = probabilities.argmax(-1)
            else:
                tempered = torch.softmax(logits.float() / temperature, dim=-1)
                next_ids = torch.multinomial(tempered, 1, generator=generator).squeeze(-1)
            for i in torch.nonzero(~finished).flatten().tolist():
                generated[i].append(int(next_ids[i]))
                chosen_probabilities.append(float(probabilities[i, next_ids[i]]))
            finished |= next_ids == tokenizer.eos_token_id
            next_ids = torch.where(finished & (next_ids != tokenizer.eos_token_id), tokenizer.pad_token_id, next_ids)
            input_ids = torch.cat([input_ids, next_ids[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids)[:, None]], dim=1)
            if bool(finished.all()):
                break
    completions = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    return completions, chosen_probabilities


def evaluate_accuracy(model, tokenizer, problems: Sequence[Problem], temperature: float, max_new_tokens: int,
                      n_samples: int = 1, seed: int = 0) -> dict[str, float]:
    """Exact-match accuracy of completions (text before EOS equals the answer), with token statistics.

    Returns ``accuracy``, ``mean_chosen_probability`` (mean π of the generated tokens),
    ``fraction_chosen_below_0.05`` (share of generated tokens with π < 0.05, the tail whose importance ratios
    inflate under reuse) and ``mean_completion_tokens``.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    prompts = [p.prompt for p in problems for _ in range(n_samples)]
    answers = [p.answer for p in problems for _ in range(n_samples)]
    was_training = model.training
    model.eval()
    completions, probabilities = sample_completions(model, tokenizer, prompts, temperature, max_new_tokens, generator)
    model.train(was_training)
    correct = sum(c.strip() == a for c, a in zip(completions, answers, strict=True))
    return {
        "accuracy": correct / len(prompts),
        "mean_chosen_probability": sum(probabilities) / len(probabilities),
        "fraction_chosen_below_0.05": sum(p < 0.05 for p in probabilities) / len(probabilities),
        "mean_completion_tokens": len(probabilities) / len(prompts),
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
