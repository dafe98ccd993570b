"""What determines the warm-started weights: :class:`WarmstartConfig`, read by dgg's own config loader, and the
hash of it under which the built model is cached (``dgg.warmstart`` builds it)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dgg.config import apply_override, from_dict
from dgg.config_schema import ConfigError
from dgg.tiny import DEFAULT_CHARACTERS, TinyModelConfig

# Bump when the training recipe changes in a way the config does not capture, so old caches are not reused.
FORMAT_VERSION = 1


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
        _validate(self)


def _check(condition: bool, name: str, allowed: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"warmstart config: {name} must be {allowed}, got {value!r}")


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


def config_to_mapping(config: WarmstartConfig) -> dict[str, Any]:
    """Plain nested dict of the config (what ``warmstart.yaml`` holds)."""
    return dataclasses.asdict(config)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> WarmstartConfig:
    """The config of a YAML file (defaults if ``path`` is None) with ``key=value`` overrides applied (dotted
    for the model: ``model.hidden_size=64``), read as every dgg config is (``dgg.config``)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"warmstart config file {str(path)!r} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"warmstart config file {str(path)!r} must hold a mapping of field: value")
    for item in overrides:
        apply_override(values, item)
    return from_dict(WarmstartConfig, values)


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
