"""The verl worker's pure helpers, importable without verl: its ``DGG_*`` settings and the reuse index of an
optimizer step in verl's loop (tested in the main suite; the worker itself in tests_verl/)."""

from __future__ import annotations

import os
from dataclasses import fields

from dgg.errors import UserError
from dgg.reuse.controller import check_fresh_drop
from dgg.reuse_rules import RuleSettings, parse_rule_names

ENV_PREFIX = "DGG_"


def reuse_index(step_in_batch: int, mini_batches_per_epoch: int) -> int:
    """k (1-based) of the ``step_in_batch``-th (0-based) optimizer step of one rollout batch."""
    return step_in_batch // mini_batches_per_epoch + 1


def mini_batches_per_epoch(batch_size_per_rank: int, mini_batch_size: int | None, num_mini_batch: int | None,
                           data_parallel_size: int) -> int:
    """How many optimizer steps one epoch over the batch takes, computed as ``train_mini_batch`` cuts it."""
    if mini_batch_size is None:
        return num_mini_batch
    return batch_size_per_rank // (mini_batch_size // data_parallel_size)


def settings_from_environment(environ=os.environ) -> tuple[str, RuleSettings, str]:
    """(rule spec, rule settings, tied-lm_head mode) from ``DGG_RULE``, ``DGG_TAU``, ``DGG_WINDOW``, ...

    Every field of :class:`dgg.reuse_rules.RuleSettings` has a variable ``DGG_<FIELD>``; unset ones keep the
    defaults (the paper's rule, τ = 0.5, W = 20). Bad values raise :class:`UserError` naming the variable.
    """
    spec = environ.get(f"{ENV_PREFIX}RULE", "dgg")
    try:
        parse_rule_names(spec)
    except ValueError as error:
        raise UserError(f"{ENV_PREFIX}RULE: {error}") from None
    values = {}
    for field in fields(RuleSettings):
        name = f"{ENV_PREFIX}{field.name.upper()}"
        if name not in environ:
            continue
        kind = type(field.default)
        try:
            values[field.name] = kind(environ[name])
        except ValueError:
            raise UserError(f"{name}={environ[name]!r} is not a valid {kind.__name__}") from None
    settings = RuleSettings(**values)
    try:
        check_fresh_drop(settings.fresh_drop)
    except ValueError as error:
        raise UserError(f"{ENV_PREFIX}FRESH_DROP: {error}") from None
    if "kl" in parse_rule_names(spec) and settings.kl_estimator != "k1":
        raise UserError(f"{ENV_PREFIX}RULE=kl under verl needs {ENV_PREFIX}KL_ESTIMATOR=k1: verl logs Spinning Up's "
                        "k1 estimate (actor/ppo_kl), not SB3's k3")
    if "m2" in parse_rule_names(spec):
        raise UserError(f"{ENV_PREFIX}RULE: the m2 rule needs mean((log r)^2), which verl's loss does not report; "
                        "valid under verl: dgg, kl, clip, nosignal, gradnorm, none")
    tied = environ.get(f"{ENV_PREFIX}TIED", "output")
    return spec, settings, tied


def watch_only_from_environment(environ=os.environ) -> bool:
    """``DGG_WATCH_ONLY``: 1/true applies every step as stock verl would and logs what the rule would have done."""
    raw = environ.get(f"{ENV_PREFIX}WATCH_ONLY", "0").strip().lower()
    if raw not in ("0", "1", "true", "false", "yes", "no", ""):
        raise UserError(f"{ENV_PREFIX}WATCH_ONLY={raw!r}: expected 1 or 0 (true or false)")
    return raw in ("1", "true", "yes")
