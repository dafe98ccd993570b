"""The gradient gate: the online z-score test of Eq. 8 (paper §5, Algorithm 1, Appendix G.2).

Pure Python on purpose: it sees one float per update, so it has no framework dependency and can sit in any
training loop (TRL, verl, a hand-written one).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

HISTORY_MODES = ("all", "reuse", "same_k")


def check_gate_settings(tau, window, history, prefix: str = "") -> None:
    """The one check of the gate's settings, for the gate itself, dgg's config (``prefix="reuse."``) and the TRL
    config (``prefix="dgg_"``): a ValueError that names the field as the caller spells it."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or math.isnan(tau) or tau == -math.inf:
        raise ValueError(f"{prefix}tau must be a real number or +inf (got {tau!r})")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"{prefix}window must be an integer >= 2 (got {window!r})")
    if history not in HISTORY_MODES:
        raise ValueError(f"{prefix}history must be one of {HISTORY_MODES} (got {history!r})")


@dataclass(frozen=True)
class GateDecision:
    """What the gate concluded about one update attempt.

    energy: g_t = ‖G_lm‖²_F as observed.
    delta: Δg_t = g_t − g_prev (g_prev: the last *accepted* energy); None on the very first observation.
    z: z_t = (Δg_t − μ_t) / (σ_t + ε) of Eq. 8; None while fewer than 2 increments are held.
    ready: the window of increments was full, so the test was allowed to fire.
    discard: drop this update's gradient before the optimizer and end reuse of the batch.
    reason: why it was discarded ("zscore" or "non_finite"), None when accepted.
    """

    energy: float
    delta: float | None
    z: float | None
    ready: bool
    discard: bool
    reason: str | None


def _mean_and_sample_std(values: deque[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)  # ddof = 1
    return mean, math.sqrt(variance)


class GradientGate:
    """Decides, per update, whether a reuse step's gradient may reach the optimizer.

    Args:
        tau: the anomaly threshold τ of Eq. 8; a reuse step (k > 1) with z_t > τ is discarded.
            The paper picks τ from {0.1, 0.5, 1.0}. ``float('inf')`` never discards a finite step.
        window: W, how many past accepted increments Δg form μ_t and σ_t (paper: 20). Gating starts
            once the window is full.
        eps: ε in the denominator of Eq. 8 (paper: 1e-8).
        history: which accepted increments enter the window. ``"all"`` (default, the paper's rule):
            every one. ``"reuse"``: only those observed at k > 1, so the routine jump in energy at each
            fresh batch does not widen σ. ``"same_k"``: one window per reuse index k, and a step at k is
            scored against earlier increments at the same k (so k = 4 against past k = 4 steps); a window fills
            after W batches, so pick a smaller W for short runs. g_prev advances on every accepted observation
            in every mode. "reuse" and "same_k" are dgg's variants, not the paper's rule.
    """

    def __init__(self, tau: float = 0.5, window: int = 20, eps: float = 1e-8, history: str = "all"):
        check_gate_settings(tau, window, history)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0 (got {eps!r})")
        self.tau = float(tau)
        self.window = window
        self.eps = float(eps)
        self.history = history
        self._windows: dict[int, deque[float]] = {}  # keyed by _window_key(k); one key except for "same_k"
        self._last_accepted_energy: float | None = None
        self.observations = 0
        self.discards = 0
        self.discards_by_reason: dict[str, int] = {}

    def _window_key(self, reuse_index: int) -> int:
        return reuse_index if self.history == "same_k" else 0

    def _increments(self, reuse_index: int) -> deque[float]:
        return self._windows.setdefault(self._window_key(reuse_index), deque(maxlen=self.window))

    def ready_at(self, reuse_index: int) -> bool:
        """The window a step at ``reuse_index`` is scored against is full, so the z-test may fire there."""
        return len(self._increments(reuse_index)) == self.window

    @property
    def ready(self) -> bool:
        """The window is full, so the z-test may fire (for ``history="same_k"``: the window of k = 2)."""
        return self.ready_at(2)

    def observe(self, energy: float, reuse_index: int) -> GateDecision:
        """Test one update's lm_head gradient energy and record the outcome; call once per update attempt,
        before the optimizer.

        Args:
            energy: g_t = ‖G_lm‖²_F of this update (a float or a 0-dim tensor).
            reuse_index: k of Algorithm 1, 1-based: 1 is the first update on a fresh rollout batch.
        """
        decision = self.test(energy, reuse_index)
        self.record(decision, reuse_index)
        return decision

    def test(self, energy: float, reuse_index: int) -> GateDecision:
        """Eq. 8 on one update's energy, changing nothing (:meth:`observe` is this, then :meth:`record`)."""
        if isinstance(reuse_index, bool) or not isinstance(reuse_index, int) or reuse_index < 1:
            raise ValueError(f"reuse_index must be an integer >= 1 (got {reuse_index!r})")
        energy = float(energy)
        if not math.isfinite(energy):
            return GateDecision(energy, None, None, self.ready_at(reuse_index), True, "non_finite")
        if self._last_accepted_energy is None:  # the first observation only sets g_prev
            return GateDecision(energy, None, None, self.ready_at(reuse_index), False, None)
        delta = energy - self._last_accepted_energy
        increments = self._increments(reuse_index)
        z = None
        if len(increments) >= 2:
            mean, std = _mean_and_sample_std(increments)
            z = (delta - mean) / (std + self.eps)
        ready = len(increments) == self.window
        if ready and reuse_index > 1 and z is not None and z > self.tau:
            return GateDecision(energy, delta, z, ready, True, "zscore")
        return GateDecision(energy, delta, z, ready, False, None)

    def record(self, decision: GateDecision, reuse_index: int, applied: bool | None = None) -> None:
        """Account for a tested step. ``applied`` (default: the gate's own answer): the step reached the optimizer,
        so its energy becomes g_prev and its increment enters the window (Algorithm 1, line 11: the statistics
        move only with applied updates); a step the gate discarded and nobody applied only counts."""
        self.observations += 1
        if not (not decision.discard if applied is None else applied):
            if decision.discard:
                self.discards += 1
                self.discards_by_reason[decision.reason] = self.discards_by_reason.get(decision.reason, 0) + 1
            return
        if not math.isfinite(decision.energy):
            return
        self._last_accepted_energy = decision.energy
        if decision.delta is not None and (self.history != "reuse" or reuse_index > 1):
            self._increments(reuse_index).append(decision.delta)

    def counters(self) -> dict[str, int]:
        """Flat counters for a logger: ``gate/observations``, ``gate/discards``, ``gate/discards_<reason>``."""
        out = {"gate/observations": self.observations, "gate/discards": self.discards}
        out.update({f"gate/discards_{r}": n for r, n in sorted(self.discards_by_reason.items())})
        return out

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot (settings included) from which decisions continue identically."""
        return {
            "tau": self.tau if math.isfinite(self.tau) else str(self.tau),
            "window": self.window,
            "eps": self.eps,
            "history": self.history,
            "increments": list(self._windows.get(0, ())),  # the one window of "all" and "reuse"
            "increments_by_index": {str(k): list(v) for k, v in sorted(self._windows.items()) if k},
            "last_accepted_energy": self._last_accepted_energy,
            "observations": self.observations,
            "discards": self.discards,
            "discards_by_reason": dict(self.discards_by_reason),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a snapshot from :meth:`state_dict`, settings included."""
        missing = {"tau", "window", "eps", "history", "increments", "last_accepted_energy"} - set(state)
        if missing:
            raise ValueError(f"gate state is missing fields {sorted(missing)}")
        restored = GradientGate(float(state["tau"]), int(state["window"]), float(state["eps"]), state["history"])
        windows = {0: state["increments"], **{int(k): v for k, v in state.get("increments_by_index", {}).items()}}
        for key, values in windows.items():
            if len(values) > restored.window:
                raise ValueError(f"gate state holds {len(values)} increments" + (f" at k={key}" if key else "")
                                 + f", more than window={restored.window}")
        self.tau, self.window, self.eps, self.history = restored.tau, restored.window, restored.eps, restored.history
        self._windows = {key: deque((float(v) for v in values), maxlen=self.window)
                         for key, values in windows.items() if values}
        last = state["last_accepted_energy"]
        self._last_accepted_energy = None if last is None else float(last)
        self.observations = int(state.get("observations", 0))
        self.discards = int(state.get("discards", 0))
        self.discards_by_reason = {str(k): int(v) for k, v in state.get("discards_by_reason", {}).items()}

    def __repr__(self) -> str:
        return (f"GradientGate(tau={self.tau}, window={self.window}, eps={self.eps}, history={self.history!r}, "
                f"held={sum(len(v) for v in self._windows.values())}, discards={self.discards}/{self.observations})")
