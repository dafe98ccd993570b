"""One reuse step for every framework: the decision dgg exists for, made in one framework-free place.

Per update attempt (Algorithm 1, lines 5–9), between the last backward and the optimizer:

1. gather the attempt's signals: the ratio statistics of each micro-batch, token-weighted, plus the lm_head
   energy and the global gradient norm read before clipping;
2. agree across ranks through a callable the host supplies (``agree(values, op)`` with op ``"sum"`` or
   ``"max"``; identity on one process), so every rank holds the same numbers and decides alike;
3. ask the rule (``dgg.reuse_rules``) and let it record the outcome;
4. return a :class:`StepVerdict`: apply or drop, stop or go on, why, and the values, under one metric
   vocabulary (docs/metrics.md).

The reference trainer, ``DGGGRPOTrainer`` (TRL) and ``DGGTrainingWorker`` (verl) all call this; they only
translate their loop (which reuse index, which micro-batches, which ranks) and act on the verdict. With
``watch_only`` every step is applied and the rule's answer is logged as what it *would* have done, so a team
can watch a rule on its own runs before switching it on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from dgg.reuse_rules import AttemptSignals, DGGRule, RuleSettings, make_rule

Agree = Callable[[list[float], str], list[float]]
COUNTS = ("silenced_tokens", "masked_tokens")  # statistics that add up over micro-batches
MAXIMA = ("ratio_max",)  # statistics whose largest micro-batch value is the attempt's
STATE_FILE = "dgg_reuse_state.json"  # what TRL and verl checkpoints hold beside their own state
FRESH_DROPS = ("end_batch", "skip_step")  # what a drop at k = 1 does: end the batch, or skip the step alone


def one_process(values: list[float], op: str) -> list[float]:
    """The agreement of a single process: nothing to agree with."""
    return values


def torch_distributed(group=None, device=None) -> Agree:
    """Agreement over a ``torch.distributed`` process group (all-reduce in float64)."""
    import torch
    import torch.distributed as dist

    def agree(values: list[float], op: str) -> list[float]:
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
        return tensor.tolist()

    return agree


@dataclass(frozen=True)
class StepVerdict:
    """What to do with one update attempt. ``apply``: the step reaches the optimizer; otherwise its gradient is
    dropped before it and reuse of the batch ends (``stop``), unless ``skip_only``: a drop on fresh data (k = 1)
    under ``fresh_drop="skip_step"``, after which the batch goes on. ``reason``: why it was dropped (``dgg:zscore``,
    ``kl``, ``non_finite_grad``, ...). ``would_stop``/``would_reason``: the rule's own answer, which watch mode
    logs without acting on it. ``statistics``: the token-weighted micro-batch statistics (``kl``,
    ``clip_ratio``, ...). ``values``: what the rules computed (``dgg/z``, ``kl/estimate``, ...)."""

    apply: bool
    reason: str | None
    signals: AttemptSignals
    statistics: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    would_stop: bool = False
    would_reason: str | None = None
    watch_only: bool = False
    skip_only: bool = False

    @property
    def stop(self) -> bool:
        """Reuse of the batch ends with this attempt: it was dropped, and not as a step skip alone."""
        return not self.apply and not self.skip_only

    def metrics(self) -> dict:
        """The attempt under dgg's one vocabulary, the same from the trainer, TRL and verl (docs/metrics.md)."""
        signals, values = self.signals, self.values
        record = {
            "reuse_index": signals.reuse_index,
            "actor/applied": self.apply,
            "actor/grad_norm": finite_or_none(signals.grad_norm),
            "actor/lm_head_grad_energy": finite_or_none(signals.lm_head_energy),
            **{f"actor/{key}": value for key, value in self.statistics.items()},
            "actor/active_tokens": signals.active_tokens,
            "actor/has_signal": signals.has_signal,
            "gate/z": finite_or_none(values.get("dgg/z")),
            "gate/delta": finite_or_none(values.get("dgg/delta")),
            "gate/ready": bool(values.get("dgg/ready", False)),
            "gate/discard": self.reason == "dgg:zscore",  # the paper's gate dropped this step
            "gate/reason": "zscore" if self.reason == "dgg:zscore" else self.reason,
            "reuse/stop": self.stop and self.reason is not None and not self.reason.startswith("non_finite"),
            "reuse/stop_reason": self.reason,
            "reuse/step_skipped": self.skip_only,
            **{key: value for key, value in values.items() if not key.startswith("dgg/")},
        }
        if self.watch_only:
            record["reuse/would_stop"], record["reuse/would_stop_reason"] = self.would_stop, self.would_reason
        return record

    def numeric_metrics(self) -> dict[str, float]:
        """:meth:`metrics` as numbers only (booleans as 0/1; reasons and missing values left out), for loggers
        that average each key over steps, as TRL's and verl's do."""
        return {key: float(value) for key, value in self.metrics().items()
                if isinstance(value, (int, float)) and value is not None}


class ReuseController:
    """Gathers an attempt's signals, agrees on them across ranks, asks the reuse rule, and returns a verdict.

    rule: a rule spec such as ``"dgg"``, ``"kl"`` or ``"dgg+nosignal"`` (``dgg.reuse_rules``). Without a ``dgg``
    rule the paper's gate still watches at τ = ∞ (applied steps only), so z is logged in every mode (Fig. 3).
    watch_only: apply every step and log what the rule would have done. agree: see :func:`torch_distributed`.
    ``settings.fresh_drop`` says what a drop on fresh data (k = 1, every mini-batch of a batch's first pass)
    does: ``end_batch`` ends the batch there, as Algorithm 1 reads, so its remaining fresh mini-batches go
    unused; ``skip_step`` drops that step alone and the batch goes on, as a pre-training step skip does. A drop
    during reuse (k > 1) always ends the batch.
    """

    def __init__(self, rule: str = "dgg", settings: RuleSettings | None = None, *, watch_only: bool = False,
                 agree: Agree = one_process):
        settings = settings or RuleSettings()
        check_fresh_drop(settings.fresh_drop)
        self.skip_fresh_drops = settings.fresh_drop == "skip_step"
        self.rule = make_rule(rule, settings)
        self.gate_rule = self.rule.find("dgg") or DGGRule(math.inf, settings.window, settings.history)
        self.gate = self.gate_rule.gate
        self.watch_only, self.agree = watch_only, agree
        self._micro_batches: list[tuple[Mapping[str, float], float, bool]] = []

    # -- 1. gather ------------------------------------------------------------------------------------------
    def add_micro_batch(self, statistics: Mapping[str, float], tokens: float, has_signal: bool) -> None:
        """One micro-batch of the attempt: its ratio statistics (means over its ``tokens`` active tokens, except
        :data:`COUNTS` and :data:`MAXIMA`) and whether any of its advantages is non-zero."""
        self._micro_batches.append(({k: float(v) for k, v in statistics.items()}, float(tokens), bool(has_signal)))

    def discard_micro_batches(self) -> None:
        """Forget what was gathered so far."""
        self._micro_batches = []

    def abandon(self, reuse_index: int, reason: str) -> StepVerdict:
        """The verdict on an attempt given up before its decision (a non-finite loss): what was gathered is
        forgotten, no rule sees it, and it is dropped (ending the batch unless fresh drops only skip)."""
        self.discard_micro_batches()
        return StepVerdict(False, reason, AttemptSignals(reuse_index), watch_only=self.watch_only,
                           skip_only=self._skips(reuse_index))

    def _skips(self, reuse_index: int) -> bool:
        return self.skip_fresh_drops and reuse_index == 1

    def _gather(self) -> tuple[dict[str, float], float, bool]:
        """Token-weighted statistics of the attempt over micro-batches and ranks, its active tokens, has-signal."""
        parts, self._micro_batches = self._micro_batches, []
        local_tokens = sum(tokens for _, tokens, _ in parts)
        local_signal = any(signal for _, _, signal in parts)
        tokens, signal = self.agree([local_tokens, float(local_signal)], "sum")
        total = max(tokens, 1.0)
        names = sorted({key for statistics, _, _ in parts for key in statistics})
        names = [n for n in names if n not in MAXIMA] + [n for n in names if n in MAXIMA]
        sums, maxima = {}, {}
        for name in names:
            for statistics, part_tokens, _ in parts:
                if name not in statistics:
                    continue
                value = statistics[name]
                if name in MAXIMA:
                    maxima[name] = max(maxima.get(name, -math.inf), value)
                else:  # counts add up; everything else is a mean over the attempt's active tokens
                    sums[name] = sums.get(name, 0.0) + value * (1.0 if name in COUNTS else part_tokens / total)
        if sums:
            sums = dict(zip(sums, self.agree(list(sums.values()), "sum")))
        if maxima:
            maxima = dict(zip(maxima, self.agree(list(maxima.values()), "max")))
        statistics = {name: (sums[name] if name in sums else maxima[name]) for name in names
                      if name in sums or name in maxima}
        return statistics, tokens, signal > 0

    # -- 2–4. agree, decide, say -----------------------------------------------------------------------------
    def decide(self, reuse_index: int, lm_head_energy: float, grad_norm: float | None = None) -> StepVerdict:
        """The verdict on the attempt whose micro-batches were added. ``lm_head_energy`` and ``grad_norm`` are
        read before clipping and are already the same on every rank (the probe and all-reduced gradients)."""
        statistics, tokens, has_signal = self._gather()
        signals = AttemptSignals(
            reuse_index=reuse_index, lm_head_energy=lm_head_energy, approx_kl=statistics.get("kl"),
            log_ratio_mean=statistics.get("log_ratio_mean"), log_ratio_sq_mean=statistics.get("log_ratio_sq_mean"),
            clip_fraction=statistics.get("clip_ratio"), ratio_max=statistics.get("ratio_max"), grad_norm=grad_norm,
            active_tokens=int(tokens), has_signal=has_signal)
        if not (math.isfinite(lm_head_energy) and (grad_norm is None or math.isfinite(grad_norm))):
            # A non-finite gradient never reaches a rule or the optimizer, in any mode.
            return StepVerdict(False, "non_finite_grad", signals, statistics, watch_only=self.watch_only,
                               skip_only=self._skips(reuse_index))
        verdict = self.rule.decide(signals)  # line 6
        values = verdict.values
        if self.gate_rule not in self.rule.rules:  # the watching gate: z in every mode
            values = {**self.gate_rule.decide(signals).values, **values}
        applied = verdict.apply or self.watch_only
        self.rule.record(signals, applied)  # stateful rules move with what was applied
        if not applied:
            self.rule.count_stop(verdict.reason)
        if self.gate_rule not in self.rule.rules:
            self.gate_rule.record(signals, applied)
        if self.watch_only:
            return StepVerdict(True, None, signals, statistics, values, not verdict.apply, verdict.reason, True)
        return StepVerdict(verdict.apply, verdict.reason, signals, statistics, values,
                           skip_only=not verdict.apply and self._skips(reuse_index))

    # -- one state file ------------------------------------------------------------------------------------
    @property
    def stops_by_reason(self) -> dict[str, int]:
        return self.rule.stops_by_reason

    def state_dict(self) -> dict:
        """JSON: the rule's state and the watching gate's (when the rule has no gate of its own)."""
        return {"reuse_rule": self.rule.state_dict(), "watch": self.gate_rule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rule.load_state_dict(state["reuse_rule"])
        if "watch" in state:
            self.gate_rule.load_state_dict(state["watch"])


def check_fresh_drop(value: str) -> None:
    """``fresh_drop`` is ``end_batch`` or ``skip_step`` (ValueError naming the allowed values otherwise)."""
    if value not in FRESH_DROPS:
        raise ValueError(f"fresh_drop must be one of {', '.join(FRESH_DROPS)} (got {value!r})")


def finite_or_none(value: float | None) -> float | None:
    """None for a missing or non-finite value (JSON has no NaN), else the value."""
    return value if value is None or math.isfinite(value) else None
