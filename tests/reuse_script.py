"""One scripted sequence of update attempts, for the test that the trainer, TRL and verl decide alike.

Each framework's glue feeds the same per-micro-batch statistics, token counts, lm_head energies and gradient
norms into its :class:`dgg.reuse.ReuseController`; every path must reach the verdicts of a bare controller fed
directly, with the same metric keys and values. The sequence exercises an applied step, the paper's gate
dropping a spike, the KL stop, the no-signal guard at k = 1 and a non-finite gradient. Used by
tests/reuse/test_reuse_controller.py, tests/integrations/test_integrations_trl.py and tests_verl/test_verl_adapter.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dgg.reuse import ReuseController
from dgg.reuse_rules import RuleSettings

RULE = "dgg+kl+nosignal"
SETTINGS = RuleSettings(tau=1.0, window=2, target_kl=0.02, kl_estimator="k1")  # k1: what verl reports


@dataclass(frozen=True)
class Attempt:
    reuse_index: int
    log_ratio_means: tuple[float, float]  # per micro-batch; Spinning Up's KL is minus their token-weighted mean
    clip_ratios: tuple[float, float]
    energy: float
    grad_norm: float
    has_signal: bool = True


SCRIPT = [
    Attempt(1, (0.0, 0.0), (0.0, 0.0), 1.0, 2.0),
    Attempt(2, (-0.002, -0.006), (0.01, 0.03), 1.1, 2.1),
    Attempt(3, (-0.004, -0.008), (0.02, 0.04), 1.2, 2.2),
    Attempt(1, (0.0, 0.0), (0.0, 0.0), 2.0, 3.0),
    Attempt(2, (-0.003, -0.001), (0.0, 0.1), 2.05, 3.1),
    Attempt(3, (-0.003, -0.005), (0.05, 0.05), 50.0, 30.0),  # an lm_head spike: the gate drops it
    Attempt(1, (0.0, 0.0), (0.0, 0.0), 1.5, 2.5),
    Attempt(2, (-0.04, -0.06), (0.2, 0.3), 1.4, 2.4),  # k1 KL ≈ 0.05 > 1.5 × 0.02: the KL stop
    Attempt(1, (0.0, 0.0), (0.0, 0.0), 1.6, 2.6, has_signal=False),  # no advantage: the no-signal guard
    Attempt(1, (0.0, 0.0), (0.0, 0.0), math.nan, 2.0),  # a non-finite gradient: no rule is asked
]
EXPECTED_REASONS = [None, None, None, None, None, "dgg:zscore", None, "kl", "nosignal:no_advantage",
                    "non_finite_grad"]


def statistics(attempt: Attempt, micro_batch: int) -> dict[str, float]:
    return {"log_ratio_mean": attempt.log_ratio_means[micro_batch], "clip_ratio": attempt.clip_ratios[micro_batch]}


def reference_metrics(tokens: tuple[float, float]) -> list[dict[str, float]]:
    """The numeric metrics a bare controller gives each attempt, micro-batches of ``tokens`` active tokens."""
    controller = ReuseController(RULE, SETTINGS)
    out = []
    for attempt in SCRIPT:
        for index, count in enumerate(tokens):
            controller.add_micro_batch(statistics(attempt, index), count, attempt.has_signal)
        out.append(controller.decide(attempt.reuse_index, attempt.energy, attempt.grad_norm).numeric_metrics())
    assert [not m["actor/applied"] for m in out] == [r is not None for r in EXPECTED_REASONS]
    return out
