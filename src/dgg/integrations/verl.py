"""Dynamic Gradient Gating inside verl (tested on verl 0.9.1, the model-engine worker path).

Turning DGG on in an existing verl GRPO run is one module and two settings::

    VERL_USE_EXTERNAL_MODULES=dgg.integrations.verl      # importing it installs the worker below
    actor_rollout_ref.actor.ppo_epochs=4                 # K of Algorithm 1
    DGG_TAU=0.5                                          # optional; DGG_RULE, DGG_WINDOW, ... (see docs/verl.md)

Both environment variables must reach every Ray worker (``+ray_kwargs.ray_init.runtime_env.env_vars.NAME=...``).

Where it hooks. verl's actor update is ``TrainingWorker.train_mini_batch``: it cuts one rollout batch into
mini-batches and iterates over them ``ppo_epochs`` times, calling ``train_batch`` → ``engine.train_batch`` →
``engine.optimizer_step`` once per mini-batch. :class:`DGGTrainingWorker` wraps ``engine.optimizer_step``: after
the last backward of a mini-batch, with gradients reduced across data-parallel ranks and before clipping, it
reads the lm_head gradient energy (:class:`dgg.LMHeadGradProbe`, exact on FSDP2 shards) and asks
:class:`dgg.reuse.ReuseController`, the decision the reference trainer and TRL make too; its statistics are
all-reduced over the data-parallel group, so every rank decides alike. On a drop the gradients are cleared and the
optimizer is not called (AdamW's moments and step count stay untouched); the remaining mini-batches of that
rollout batch are skipped without a forward or backward, but the loop still runs on every rank (so verl's own
collectives stay matched) and the LR scheduler is stepped exactly where verl steps it.

k of Algorithm 1 is the epoch: the i-th optimizer step of a batch (0-based) with m mini-batches per epoch has
k = i // m + 1, so with one mini-batch per epoch every step is one pass, as in the paper.

The rule sees the lm_head energy, the global gradient norm before clipping, whether any advantage in the
mini-batch is non-zero, and verl's own loss metrics (``actor/ppo_kl``, Spinning Up's k1 estimate, and
``actor/pg_clipfrac``) token-weighted over micro-batches and ranks; SB3's k3 KL is not computed by verl, so
``kl`` here needs ``DGG_KL_ESTIMATOR=k1``. ``DGG_WATCH_ONLY=1`` applies every step as stock verl and logs what the
rule would have done; ``DGG_UPDATE_LOG=PATH`` (rank 0) appends one JSON line per update in dgg's vocabulary, which
``dgg replay`` reads exactly (verl's own loggers average each step's updates).
"""

from __future__ import annotations

import json
import math
import os

try:
    import verl  # noqa: F401  (first: verl itself imports this module when named in VERL_USE_EXTERNAL_MODULES)
    from verl.single_controller.base.decorator import make_nd_compute_dataproto_dispatch_fn, register
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker
except ImportError as error:  # verl is an optional extra with its own pins
    raise ImportError("dgg.integrations.verl needs verl, an optional extra of dgg: pip install dgg[verl] "
                      "(in its own environment: verl pins transformers and tensordict)") from error

import torch
import torch.distributed as dist

from dgg.errors import UserError
from dgg.integrations.verl_settings import (  # noqa: F401 (verl-free helpers, re-exported)
    ENV_PREFIX,
    mini_batches_per_epoch,
    reuse_index,
    settings_from_environment,
    watch_only_from_environment,
)
from dgg.probe import LMHeadGradProbe
from dgg.reuse.controller import STATE_FILE, ReuseController, torch_distributed
from dgg.reuse_rules import RuleSettings

LEGACY_STATE_FILE = "dgg_rule_state.json"  # what checkpoints written before the controller hold; still read


class _LossSignals:
    """Wraps verl's loss function: each micro-batch's statistics go to the controller (verl's ppo_kl and
    pg_clipfrac are means over the micro-batch's response tokens, so the controller weights them by those)."""

    STATISTICS = {"actor/ppo_kl": ("log_ratio_mean", -1.0), "actor/pg_clipfrac": ("clip_ratio", 1.0)}

    def __init__(self, loss_fn, controller: ReuseController):
        self.loss_fn, self.controller = loss_fn, controller

    def __call__(self, *args, **kwargs):
        loss, metrics = self.loss_fn(*args, **kwargs)
        data = kwargs["data"] if "data" in kwargs else args[1]
        statistics = {}
        for key, (name, sign) in self.STATISTICS.items():
            metric = metrics.get(key)
            if metric is not None:
                statistics[name] = sign * float(metric.aggregate() if hasattr(metric, "aggregate") else metric)
        padded = data.select(*(k for k in ("advantages", "response_mask") if k in data)).to_padded_tensor()
        tokens = float(padded["response_mask"].sum()) if "response_mask" in padded else 1.0
        has_signal = "advantages" not in padded or bool((padded["advantages"] != 0).any())
        self.controller.add_micro_batch(statistics, tokens, has_signal)
        return loss, metrics


class DGGTrainingWorker(TrainingWorker):
    """verl's actor ``TrainingWorker`` with a reuse rule (the paper's gate by default) before every optimizer step."""

    def __init__(self, config, rule_spec: str | None = None, settings: RuleSettings | None = None,
                 tied: str | None = None, watch_only: bool | None = None):
        super().__init__(config)
        env_spec, env_settings, env_tied = settings_from_environment()
        self.dgg_controller = ReuseController(
            rule_spec or env_spec, settings or env_settings,
            watch_only=watch_only_from_environment() if watch_only is None else watch_only)
        self.dgg_rule = self.dgg_controller.rule
        self._update_log = os.environ.get(f"{ENV_PREFIX}UPDATE_LOG")  # one JSON line per update, for dgg replay
        self._batches = 0
        self._tied = tied or env_tied
        self._probe = None
        self._step_in_batch, self._per_epoch, self._stopped = 0, 1, False
        self._last: dict = {}

    # -- verl's entry points ------------------------------------------------------------------------------
    def set_loss_fn(self, loss_fn):
        self.loss_fn = _LossSignals(loss_fn, self.dgg_controller)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="train"), blocking=False)
    def train_mini_batch(self, data):
        self._attach()
        self._per_epoch = mini_batches_per_epoch(
            data.shape[0], tu.get(data, key="mini_batch_size", default=None),
            tu.get(data, key="num_mini_batch", default=None), self.engine.get_data_parallel_size())
        self._step_in_batch, self._stopped = 0, False
        self._batches += 1
        return super().train_mini_batch(data)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="train"), blocking=False)
    def train_batch(self, data):
        if self._stopped:
            return self._skipped_mini_batch(data)
        self.dgg_controller.discard_micro_batches()  # only this mini-batch's micro-batches make its decision
        output = super().train_batch(data)
        if output is not None:
            tu.get(output, "metrics").update(self._last)
        return output

    def save_checkpoint(self, local_path, *args, **kwargs):
        result = super().save_checkpoint(local_path, *args, **kwargs)
        if not dist.is_initialized() or dist.get_rank() == 0:
            os.makedirs(local_path, exist_ok=True)
            partial = os.path.join(local_path, STATE_FILE + ".partial")
            with open(partial, "w", encoding="utf-8") as handle:
                json.dump(self.dgg_controller.state_dict(), handle)
            os.replace(partial, os.path.join(local_path, STATE_FILE))  # never a half-written state
        return result

    def load_checkpoint(self, local_path, *args, **kwargs):
        result = super().load_checkpoint(local_path, *args, **kwargs)
        if not local_path:
            return result
        if os.path.exists(path := os.path.join(local_path, STATE_FILE)):
            with open(path, encoding="utf-8") as handle:
                self.dgg_controller.load_state_dict(json.load(handle))
        elif os.path.exists(path := os.path.join(local_path, LEGACY_STATE_FILE)):  # the rule's state alone
            with open(path, encoding="utf-8") as handle:
                self.dgg_rule.load_state_dict(json.load(handle))
        return result

    # -- the gate -----------------------------------------------------------------------------------------
    def _attach(self) -> None:
        """Once the engine has built its FSDP module: the probe on it, and the gated optimizer step."""
        if self._probe is not None:
            return
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(self.engine.module, FullyShardedDataParallel):
            raise UserError("dgg.integrations.verl: FSDP version 1 flattens parameters, so the lm_head gradient "
                            "cannot be read exactly; use actor_rollout_ref.actor.strategy=fsdp2")
        self._probe = LMHeadGradProbe(self.engine.module, tied=self._tied)
        self.dgg_controller.agree = torch_distributed(group=self.engine.get_data_parallel_group())
        self._verl_optimizer_step = self.engine.optimizer_step
        self.engine.optimizer_step = self._gated_optimizer_step

    def _gated_optimizer_step(self):
        k = reuse_index(self._step_in_batch, self._per_epoch)
        verdict = self.dgg_controller.decide(k, float(self._probe.energy()), self._grad_norm())
        self._step_in_batch += 1
        self._last = verdict.numeric_metrics()  # dgg's vocabulary (docs/metrics.md), beside verl's own metrics
        if self._update_log and (not dist.is_initialized() or dist.get_rank() == 0):
            with open(self._update_log, "a", encoding="utf-8") as handle:  # per update, where verl averages
                handle.write(json.dumps({"kind": "update", "batch": self._batches, **verdict.metrics()}) + "\n")
        if verdict.apply:
            return self._verl_optimizer_step()
        self.engine.optimizer.zero_grad(set_to_none=True)
        self._stopped = verdict.stop  # else a fresh step skipped alone (DGG_FRESH_DROP=skip_step)
        return verdict.signals.grad_norm

    def _grad_norm(self) -> float:
        """The pre-clip global gradient norm verl would have logged, without touching the gradients."""
        parameters = [p for p in self.engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm=math.inf) if parameters else torch.tensor(0.0)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _skipped_mini_batch(self, data):
        """A mini-batch of an abandoned batch: no forward, no backward, the LR schedule kept."""
        lr = self.engine.lr_scheduler_step() if tu.get(data, key="update_lr_scheduler", default=False) else None
        self._step_in_batch += 1
        if not self.engine.is_mp_src_rank_with_outputs():
            return None
        metrics = {"reuse/skipped": 1.0, **({"lr": lr} if lr is not None else {})}
        return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": metrics})


def install() -> None:
    """Make verl's actor use :class:`DGGTrainingWorker` (what importing this module does). The ``DGG_*``
    settings are checked here, so a bad value stops the launch in the driver, not later in a Ray worker."""
    settings_from_environment()
    watch_only_from_environment()
    ActorRolloutRefWorker.actor_worker_cls = DGGTrainingWorker


install()
