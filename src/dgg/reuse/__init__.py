"""The per-attempt reuse decision every framework calls: :class:`ReuseController` (see ``controller.py``)."""

from dgg.reuse.controller import STATE_FILE, ReuseController, StepVerdict, one_process, torch_distributed

__all__ = ["STATE_FILE", "ReuseController", "StepVerdict", "one_process", "torch_distributed"]
