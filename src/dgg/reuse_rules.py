"""Reuse rules: per update attempt, before the optimizer, whether to apply the step or drop it and stop reusing
the batch. The paper's gate is one rule among the early stops PPO users already know.

A rule sees the signals of one attempt (:class:`AttemptSignals`, computed on that attempt's forward and
backward, before clipping) and answers with a :class:`Verdict`. Rules combine with ``+``
(``"dgg+nosignal"``): the first rule that drops the step decides, and every rule then records whether the step
was applied, so stateful rules (the gate's window) move only with applied updates, as Algorithm 1 says.

Registered rules (``make_rule``; config keys in brackets):

- ``dgg`` — the paper's gate (Eq. 8, Algorithm 1): z-score of the lm_head energy's increment against a window
  of accepted increments; drops a reuse step (k > 1) with z > τ. [tau, window, history]
- ``kl`` — Stable-Baselines3's ``target_kl``: approx_kl = mean((r − 1) − log r) over the attempt's active
  tokens (the k3 estimator), checked before the step; drops it when approx_kl > 1.5 × target_kl.
  ``kl_estimator: k1`` uses Spinning Up's mean(log π_old − log π_θ) instead (same 1.5 factor). [target_kl]
- ``clip`` — ours: drops a reuse step when more than ``target_clip`` of the active tokens are clipped.
- ``m2`` — a stop in the spirit of M2PO: drops a reuse step when mean((log r)²) over the active tokens exceeds
  ``target_m2`` (M2PO itself masks tokens until the second moment is below its threshold; this is the stop
  version). [target_m2]
- ``nosignal`` — ours: drops a step that has nothing to give: no non-zero advantage in the batch (also at
  k = 1, and in single-use training), or, at k > 1, an lm_head energy below ``signal_floor`` × the batch's
  first (k = 1) energy. AdamW's momentum would otherwise move the weights on a zero gradient. [signal_floor]
- ``gradnorm`` — the global-gradient-norm spike skip that pre-training stacks ship, with the semantics of
  OLMo-core's ``SkipStepOptimizer.get_step_factor`` (grad-norm half): drops a step whose pre-clip global norm
  is more than ``gradnorm_sigma`` standard deviations (Bessel-corrected) from the mean of the previous
  ``gradnorm_window`` norms, in either direction, once the count with this one reaches
  max(20, gradnorm_window // 2). Every attempt's norm enters the window, dropped ones too. It applies at any
  k, so in single-use training it is a spike guard. [gradnorm_window, gradnorm_sigma]
- ``none`` — never drops a finite step (fixed-K reuse, single-use).

Every rule except ``nosignal`` and ``gradnorm`` always applies the first step of a batch (k = 1), as in
Algorithm 1.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Protocol

from dgg.gate import GradientGate

SB3_KL_FACTOR = 1.5  # SB3 and Spinning Up stop when the estimate exceeds 1.5 × target_kl
# The kl rule reads a statistic each update logs; each is an estimator of dgg.algos.kl (the one registry of KL
# estimators) applied to KL(π_old ‖ π_θ): k3 is SB3's approx_kl, k1 is Spinning Up's −mean(log r).
KL_STOP_SIGNALS = {"k3": "approx_kl", "k1": "log_ratio_mean"}


@dataclass(frozen=True)
class AttemptSignals:
    """What one update attempt measured, before clipping and before the optimizer.

    ``approx_kl`` is SB3's mean((r − 1) − log r) (k3) and ``log_ratio_mean`` is mean(log π_θ − log π_old),
    both over the attempt's active tokens (Spinning Up's estimate is ``-log_ratio_mean``).
    A signal a log does not have is None; a rule that needs it says so.
    """

    reuse_index: int
    lm_head_energy: float | None = None
    approx_kl: float | None = None
    log_ratio_mean: float | None = None
    log_ratio_sq_mean: float | None = None
    clip_fraction: float | None = None
    ratio_max: float | None = None
    grad_norm: float | None = None
    active_tokens: int | None = None
    has_signal: bool | None = None

    @classmethod
    def from_record(cls, record: dict) -> AttemptSignals:
        """The signals of one ``kind: update`` line of a run's metrics.jsonl."""
        return cls(reuse_index=int(record["reuse_index"]),
                   lm_head_energy=record.get("actor/lm_head_grad_energy"),
                   approx_kl=record.get("actor/kl"),
                   log_ratio_mean=record.get("actor/log_ratio_mean"),
                   log_ratio_sq_mean=record.get("actor/log_ratio_sq_mean"),
                   clip_fraction=record.get("actor/clip_ratio"),
                   ratio_max=record.get("actor/ratio_max"),
                   grad_norm=record.get("actor/grad_norm"),
                   active_tokens=record.get("actor/active_tokens"),
                   has_signal=record.get("actor/has_signal"))


@dataclass(frozen=True)
class Verdict:
    """apply: the step reaches the optimizer. Otherwise it is dropped and reuse of the batch ends.
    reason: which rule dropped it and why (``"kl"``, ``"dgg:zscore"``, ``"nosignal:no_advantage"``, ...).
    values: what the rule computed, for logging (e.g. ``{"dgg/z": 1.3}``)."""

    apply: bool
    reason: str | None = None
    values: dict = field(default_factory=dict)


ACCEPT = Verdict(True)


class ReuseRule(Protocol):
    name: str

    def decide(self, signals: AttemptSignals) -> Verdict: ...

    def record(self, signals: AttemptSignals, applied: bool) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RuleSignalMissing(ValueError):
    """A rule was asked to decide on a log that lacks the signal it reads."""


def _need(signals: AttemptSignals, name: str, rule: str):
    value = getattr(signals, name)
    if value is None:
        raise RuleSignalMissing(f"rule {rule!r} needs the signal {name!r}, which this attempt did not record")
    return value


class _Stateless:
    """Rules whose decision depends on the current attempt alone."""

    def record(self, signals: AttemptSignals, applied: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NeverStop(_Stateless):
    name = "none"

    def decide(self, signals: AttemptSignals) -> Verdict:
        return ACCEPT


class DGGRule:
    """The paper's gate as a rule; :class:`GradientGate` holds the math and the state."""

    name = "dgg"

    def __init__(self, tau: float = 0.5, window: int = 20, history: str = "all"):
        self.gate = GradientGate(tau=tau, window=window, history=history)

    def decide(self, signals: AttemptSignals) -> Verdict:
        energy = _need(signals, "lm_head_energy", self.name)
        decision = self.gate.test(energy, signals.reuse_index)
        values = {"dgg/z": decision.z, "dgg/delta": decision.delta, "dgg/ready": decision.ready}
        return Verdict(not decision.discard, f"dgg:{decision.reason}" if decision.discard else None, values)

    def record(self, signals: AttemptSignals, applied: bool) -> None:
        # The gate's statistics move only with applied steps; a step another rule dropped is not observed.
        decision = self.gate.test(signals.lm_head_energy, signals.reuse_index)
        if applied or decision.discard:
            self.gate.record(decision, signals.reuse_index, applied)

    def state_dict(self) -> dict:
        return self.gate.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.gate.load_state_dict(state)


class KLStop(_Stateless):
    """SB3's early stop: approx_kl > 1.5 × target_kl, checked on the attempt before its step."""

    name = "kl"

    def __init__(self, target_kl: float = 0.02, estimator: str = "k3"):
        if not (isinstance(target_kl, (int, float)) and target_kl > 0):
            raise ValueError(f"target_kl must be a number > 0 (got {target_kl!r})")
        if estimator not in KL_STOP_SIGNALS:
            raise ValueError(f"kl_estimator must be one of {tuple(KL_STOP_SIGNALS)} (got {estimator!r})")
        self.target_kl, self.estimator = float(target_kl), estimator

    def decide(self, signals: AttemptSignals) -> Verdict:
        if signals.reuse_index == 1:
            return ACCEPT
        kl = _need(signals, KL_STOP_SIGNALS[self.estimator], self.name)
        kl = -kl if self.estimator == "k1" else kl  # −mean(log r) = mean(log π_old − log π_θ)
        stop = kl > SB3_KL_FACTOR * self.target_kl
        return Verdict(not stop, "kl" if stop else None, {"kl/estimate": kl})


class ThresholdStop(_Stateless):
    """Drops a reuse step whose ``signal`` exceeds ``threshold``."""

    def __init__(self, name: str, signal: str, threshold: float):
        if not (isinstance(threshold, (int, float)) and threshold > 0):
            raise ValueError(f"the {name} rule's threshold must be a number > 0 (got {threshold!r})")
        self.name, self.signal, self.threshold = name, signal, float(threshold)

    def decide(self, signals: AttemptSignals) -> Verdict:
        if signals.reuse_index == 1:
            return ACCEPT
        value = _need(signals, self.signal, self.name)
        stop = value > self.threshold
        return Verdict(not stop, self.name if stop else None)


class NoSignalGuard:
    """Drops a step with no advantage signal (any k), or a reuse step whose energy fell below
    ``floor`` × the batch's first energy."""

    name = "nosignal"

    def __init__(self, floor: float = 1e-3):
        if not (isinstance(floor, (int, float)) and floor >= 0):
            raise ValueError(f"signal_floor must be a number >= 0 (got {floor!r})")
        self.floor = float(floor)
        self.first_energy: float | None = None

    def decide(self, signals: AttemptSignals) -> Verdict:
        if not _need(signals, "has_signal", self.name):
            return Verdict(False, "nosignal:no_advantage")
        if signals.reuse_index > 1 and self.floor > 0 and self.first_energy is not None:
            energy = _need(signals, "lm_head_energy", self.name)
            if energy < self.floor * self.first_energy:
                return Verdict(False, "nosignal:energy_floor", {"nosignal/relative_energy":
                                                                energy / self.first_energy})
        return ACCEPT

    def record(self, signals: AttemptSignals, applied: bool) -> None:
        if signals.reuse_index == 1:
            self.first_energy = signals.lm_head_energy if applied else None

    def state_dict(self) -> dict:
        return {"first_energy": self.first_energy}

    def load_state_dict(self, state: dict) -> None:
        self.first_energy = state.get("first_energy")


class GradNormSkip:
    """OLMo-core's rolling z-score step skip on the global gradient norm (see the module docstring).

    One deliberate difference: OLMo-core divides by a zero standard deviation (a window of identical norms) and
    then skips, since NaN fails its comparison; here an identical norm is z = 0 and any other is z = ∞."""

    name = "gradnorm"

    def __init__(self, window: int = 128, sigma: float = 6.0):
        if not (isinstance(window, int) and window >= 19):  # smaller windows never hold the 20 norms the test needs
            raise ValueError(f"gradnorm_window must be an integer >= 19 (got {window!r})")
        if not (isinstance(sigma, (int, float)) and sigma > 0):
            raise ValueError(f"gradnorm_sigma must be a number > 0 (got {sigma!r})")
        self.window, self.sigma = window, float(sigma)
        self.history: list[float] = []  # the previous norms, oldest first, at most `window`

    @property
    def arms_at(self) -> int:
        """How many norms, the current one included, the test needs (OLMo-core: max(20, N // 2))."""
        return max(20, self.window // 2)

    def decide(self, signals: AttemptSignals) -> Verdict:
        norm = float(_need(signals, "grad_norm", self.name))
        if len(self.history) + 1 < self.arms_at:
            return Verdict(True, None, {"gradnorm/ready": False})
        mean, std = statistics.fmean(self.history), statistics.stdev(self.history)
        z = abs(norm - mean) / std if std > 0 else (0.0 if norm == mean else math.inf)
        skip = z > self.sigma
        return Verdict(not skip, "gradnorm" if skip else None, {"gradnorm/z": z, "gradnorm/ready": True})

    def record(self, signals: AttemptSignals, applied: bool) -> None:
        self.history = [*self.history, float(signals.grad_norm)][-self.window:]

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [float(v) for v in state.get("history", [])][-self.window:]


class CombinedRule:
    """Several rules at once (``"dgg+nosignal"``): the first that drops the step decides."""

    def __init__(self, rules: list):
        self.rules = rules
        self.name = "+".join(rule.name for rule in rules)
        self.stops_by_reason: dict[str, int] = {}

    def decide(self, signals: AttemptSignals) -> Verdict:
        values: dict = {}
        verdict = ACCEPT
        for rule in self.rules:
            own = rule.decide(signals)
            values.update(own.values)
            if verdict.apply and not own.apply:
                verdict = own
        return Verdict(verdict.apply, verdict.reason, values)

    def record(self, signals: AttemptSignals, applied: bool) -> None:
        for rule in self.rules:
            rule.record(signals, applied)

    def count_stop(self, reason: str) -> None:
        self.stops_by_reason[reason] = self.stops_by_reason.get(reason, 0) + 1

    def observe(self, signals: AttemptSignals) -> Verdict:
        """decide, record and count: what a replay calls once per attempt (a trainer calls ReuseController)."""
        verdict = self.decide(signals)
        self.record(signals, verdict.apply)
        if not verdict.apply:
            self.count_stop(verdict.reason)
        return verdict

    def find(self, name: str):
        return next((rule for rule in self.rules if rule.name == name), None)

    def state_dict(self) -> dict:
        return {"rules": [rule.name for rule in self.rules], "state": [rule.state_dict() for rule in self.rules],
                "stops_by_reason": dict(self.stops_by_reason)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rules") != [rule.name for rule in self.rules]:
            raise ValueError(f"saved reuse rules {state.get('rules')} differ from the configured {self.name!r}")
        for rule, saved in zip(self.rules, state["state"]):
            rule.load_state_dict(saved)
        self.stops_by_reason = {str(k): int(v) for k, v in state.get("stops_by_reason", {}).items()}


@dataclass(frozen=True)
class RuleSettings:
    """Every rule's settings in one place (the trainer fills it from ``reuse.*``)."""

    tau: float = 0.5
    window: int = 20
    history: str = "all"
    target_kl: float = 0.02
    kl_estimator: str = "k3"
    target_clip: float = 0.2
    target_m2: float = 0.04
    signal_floor: float = 1e-3
    gradnorm_window: int = 128
    gradnorm_sigma: float = 6.0
    fresh_drop: str = "end_batch"  # not a rule's: what the controller does with a drop at k = 1


RULES: dict[str, Any] = {
    "dgg": lambda s: DGGRule(s.tau, s.window, s.history),
    "kl": lambda s: KLStop(s.target_kl, s.kl_estimator),
    "clip": lambda s: ThresholdStop("clip", "clip_fraction", s.target_clip),
    "m2": lambda s: ThresholdStop("m2", "log_ratio_sq_mean", s.target_m2),
    "nosignal": lambda s: NoSignalGuard(s.signal_floor),
    "gradnorm": lambda s: GradNormSkip(s.gradnorm_window, s.gradnorm_sigma),
    "none": lambda s: NeverStop(),
}


def parse_rule_names(spec: str) -> list[str]:
    """``"dgg+nosignal"`` -> ["dgg", "nosignal"]; unknown or repeated names raise, listing the valid ones."""
    names = [part.strip() for part in str(spec).split("+")]
    unknown = [name for name in names if name not in RULES]
    if unknown or not names:
        raise ValueError(f"unknown reuse rule {unknown[0] if unknown else spec!r}; valid rules: "
                         f"{', '.join(RULES)} (combine with +, e.g. dgg+nosignal)")
    if len(set(names)) != len(names):
        raise ValueError(f"reuse rule {spec!r} names a rule twice")
    return names


def make_rule(spec: str, settings: RuleSettings | None = None) -> CombinedRule:
    settings = settings or RuleSettings()
    return CombinedRule([RULES[name](settings) for name in parse_rule_names(spec)])


def replay(records: list[dict], rule: CombinedRule) -> list[dict]:
    """Where ``rule`` would have stopped on a logged run: one row per stop, in order.

    Exact up to the first stop only: after it, the real run would have trained on different weights. Later
    stops are what the rule does on this (counterfactual) trajectory. Attempts that followed a stop in the
    same batch are skipped, as they would not have happened.
    """
    stops, stopped_batch = [], None
    updates = [r for r in records if r.get("kind") == "update"]
    for position, record in enumerate(updates):
        if record["batch"] == stopped_batch:
            continue
        if str(record.get("gate/reason")).startswith("non_finite"):  # never reached any rule in the run either
            continue
        signals = AttemptSignals.from_record(record)
        verdict = rule.observe(signals)
        if not verdict.apply:
            stopped_batch = record["batch"]
            skipped = sum(1 for later in updates[position:] if later["batch"] == stopped_batch)
            stops.append({"batch": record["batch"], "reuse_index": signals.reuse_index, "rollouts": record.get(
                "rollouts"), "reason": verdict.reason, "exact": not stops, "updates_skipped": skipped})
    return stops
