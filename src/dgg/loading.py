"""Models and devices: which directory a ``model.path`` means (``default``, a named real model, a path or a hub
name), the device it goes on, and loading it so that nothing is silently random: every weight the model
expects must come from the checkpoint, and every weight in the checkpoint must land in the model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dgg.config import ConfigError, ModelConfig
from dgg.errors import UserError


def load_causal_lm(path: str, dtype, field: str = "model.path", strict: bool = True):
    """``AutoModelForCausalLM.from_pretrained(path)`` with errors that name ``field``.

    ``strict`` refuses a load that leaves parameters at their random initialisation (missing or mismatched
    keys) or drops weights of the checkpoint (unexpected keys) — the sign of a config.json whose model_type
    does not match the weights. ``strict=False`` (``model.strict_weights=false``) allows it on purpose."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except SafetensorError as err:
        raise UserError(f"{field} {path!r}: a weights file is corrupt or truncated ({err})") from None
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{field} {path!r}: could not load a causal LM ({first})") from None
    problems = {kind: list(info.get(kind) or []) for kind in ("missing_keys", "mismatched_keys", "unexpected_keys")}
    if strict and any(problems.values()):
        detail = "; ".join(f"{len(keys)} {kind.replace('_', ' ')} (e.g. {keys[0]})"
                           for kind, keys in problems.items() if keys)
        model_type = getattr(model.config, "model_type", "?")
        raise UserError(f"{field} {path!r}: the weights do not fit the {model_type} architecture its config.json "
                        f"names: {detail}. Check model_type in config.json; to train with the unmatched parameters "
                        "randomly initialised anyway, set model.strict_weights=false")
    return model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {name!r} but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def resolve_model_path(path: str) -> str:
    """``default`` -> the embedded warm-started tiny model (built on first use); a named model such as
    ``smollm2-135m-instruct`` -> its converted directory (fetched on first use); else the path as given."""
    from dgg import models

    if path in models.MODELS:
        try:
            return str(models.fetch(path))
        except models.ModelFetchError as err:
            raise ConfigError(f"model.path {path!r}: {err}") from err
    if path != "default":
        return path
    from dgg.warmstart import warmstart

    return str(warmstart())


def load_policy(config: ModelConfig, weights_from: str | None = None):
    """Load (model, tokenizer) from a local directory or hub name, with a message that names the field."""
    from transformers.utils import logging as hf_logging

    from dgg.loading import load_causal_lm
    from dgg.tiny import load_tokenizer

    hf_logging.disable_progress_bar()  # our own progress bar is the one to watch

    path = weights_from or resolve_model_path(config.path)
    local = Path(path).expanduser()
    if not local.exists() and (path.startswith((".", "/", "~")) or os.sep in path and path.count("/") != 1):
        raise ConfigError(f"model.path {path!r} does not exist (expected a Hugging Face model directory, "
                          "a hub name like Qwen/Qwen2.5-0.5B-Instruct, or 'default')")
    if local.exists() and not (local / "config.json").is_file():
        raise ConfigError(f"model.path {path!r} is not a Hugging Face model directory (no config.json)")
    dtype = getattr(torch, config.dtype)
    source = str(local) if local.exists() else path
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError) as err:  # missing files, or a tokenizer.json that is not JSON
        raise ConfigError(f"could not load the tokenizer of {path!r}: {type(err).__name__}: {err}") from None
    model = load_causal_lm(source, dtype, field="checkpoint" if weights_from else "model.path",
                           strict=config.strict_weights)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(resolve_device(config.device)), tokenizer


DROPOUT_CONFIG_KEYS = ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop",
                       "embd_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")


def has_active_dropout(model) -> bool:
    """True when a train-mode forward can differ from an eval-mode one (a dropout module or config rate > 0)."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    return any(isinstance(getattr(config, key, 0), (int, float)) and getattr(config, key, 0) > 0
               for key in DROPOUT_CONFIG_KEYS)
