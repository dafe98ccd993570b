"""dgg — Dynamic Gradient Gating for sample-efficient RLVR (GRPO with safe batch reuse).

The two pieces most users need:

- :class:`GradientGate` — the z-score test of Eq. 8 that decides whether a reuse step may reach the optimizer;
- :class:`LMHeadGradProbe` — the lm_head gradient energy g_t = ‖G_lm‖²_F that feeds it.
"""

from dgg.gate import GateDecision, GradientGate

__version__ = "0.1.0"
__all__ = ["GateDecision", "GradientGate", "LMHeadGradProbe", "__version__"]


def __getattr__(name: str):
    # torch-dependent pieces load on first use, so `import dgg` stays light.
    if name == "LMHeadGradProbe":
        from dgg.probe import LMHeadGradProbe

        return LMHeadGradProbe
    raise AttributeError(f"module 'dgg' has no attribute {name!r}")
