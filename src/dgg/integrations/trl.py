"""Dynamic Gradient Gating inside Hugging Face TRL: drop-in ``GRPOConfig`` / ``GRPOTrainer`` subclasses.

Turning DGG on is a two-line change for a TRL user::

    from dgg.integrations.trl import DGGGRPOConfig, DGGGRPOTrainer   # instead of GRPOConfig, GRPOTrainer
    trainer = DGGGRPOTrainer(model, reward_funcs, args=DGGGRPOConfig(num_iterations=4, ...), train_dataset=ds)

What it does (paper §5, Algorithm 1 in Appendix C, Appendix G.2), once per optimizer step:

1. after the last backward of the step (the synchronising micro-step, gradients already all-reduced under DDP)
   and *before* gradient clipping, read g_t = ‖G_lm‖²_F from :class:`dgg.LMHeadGradProbe`;
2. ``decision = gate.observe(g_t, k)`` with k the 1-based reuse index of Algorithm 1 (see
   :func:`reuse_index_of_step`);
3. on ``decision.discard``: set every gradient to ``None`` (so AdamW's moments and step count stay untouched)
   and move TRL's micro-step counter to the next generation boundary, so the next step trains on a freshly
   generated batch instead of reusing this one.

TRL's reuse loop is driven by two counters, which this module reads and never duplicates:
``GRPOTrainer._step`` (micro-steps done, incremented at the end of ``training_step``) and the config's
``steps_per_generation`` × ``num_iterations`` (the length, in micro-steps, of one generation batch's life).
See ``docs/trl.md`` for the exact semantics, including what happens to the prompts of an abandoned batch.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as error:  # trl is an optional extra
    raise ImportError(
        "dgg.integrations.trl needs TRL, which is an optional extra of dgg: pip install dgg[trl]"
    ) from error

from accelerate.utils import DistributedType, broadcast
from transformers import TrainerCallback

from dgg.gate import GradientGate, check_gate_settings
from dgg.preemption import STOP, RunStopped, StopFlag, stop_signals
from dgg.reuse.controller import STATE_FILE, ReuseController, StepVerdict, check_fresh_drop, torch_distributed
from dgg.reuse.statistics import ratio_statistics
from dgg.reuse_rules import KL_STOP_SIGNALS, AttemptSignals, RuleSettings, make_rule, parse_rule_names

GATE_STATE_FILE = "dgg_gate_state.json"  # what checkpoints written before the controller hold; still read


def reuse_index_of_step(micro_steps_done: int, steps_per_generation: int, num_iterations: int) -> int:
    """k of Algorithm 1 (1-based) for the optimizer step that has just finished its backward passes.

    TRL buffers one generation batch, cut into ``steps_per_generation`` micro-batches, and trains on it for
    ``num_iterations`` (= K) passes, so one batch lives for ``steps_per_generation * num_iterations``
    micro-steps and is regenerated whenever ``GRPOTrainer._step`` is a multiple of that. With
    ``micro_steps_done`` = ``_step`` right after the synchronising micro-step (the last of the
    ``gradient_accumulation_steps`` micro-steps of this optimizer step)::

        k = ((micro_steps_done - 1) mod (steps_per_generation * num_iterations)) // steps_per_generation + 1

    i.e. which pass over the buffered batch this step belongs to. Every micro-step of an optimizer step lies in
    the same pass because :class:`DGGGRPOConfig` requires ``steps_per_generation`` to be a multiple of
    ``gradient_accumulation_steps``. Example: ``gradient_accumulation_steps=2, steps_per_generation=4,
    num_iterations=2`` gives k = 1, 1, 2, 2, 1, 1, 2, 2, … for optimizer steps 1, 2, 3, …
    """
    if micro_steps_done < 1:
        raise ValueError(f"micro_steps_done must be >= 1 (got {micro_steps_done})")
    offset = (micro_steps_done - 1) % (steps_per_generation * num_iterations)
    return offset // steps_per_generation + 1


def next_generation_boundary(micro_steps_done: int, steps_per_generation: int, num_iterations: int) -> int:
    """The smallest multiple of ``steps_per_generation * num_iterations`` that is >= ``micro_steps_done``.

    Setting ``GRPOTrainer._step`` to it makes TRL's own ``_prepare_inputs`` regenerate on the next micro-step
    and take the first slice of the new batch: reuse of the current batch ends here.
    """
    life = steps_per_generation * num_iterations
    return -(-micro_steps_done // life) * life


@dataclass
class DGGGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the settings of Dynamic Gradient Gating.

    ``num_iterations`` is K of Algorithm 1 (the maximum number of passes over one generation batch); DGG only
    acts when it is > 1 (or on a non-finite gradient energy).
    """

    dgg_enabled: bool = field(
        default=True,
        metadata={"help": "Gate reuse steps on the lm_head gradient energy. False trains exactly like GRPOTrainer."},
    )
    """Gate reuse steps on the lm_head gradient energy. ``False`` trains exactly like ``GRPOTrainer``."""

    dgg_tau: float = field(
        default=0.5,
        metadata={"help": "Anomaly threshold tau of Eq. 8; a reuse step with z > tau is discarded. inf: never."},
    )
    """Anomaly threshold τ of Eq. 8: a reuse step (k > 1) with z_t > τ is discarded. The paper picks τ from
    {0.1, 0.5, 1.0}; ``float('inf')`` discards nothing finite."""

    dgg_window: int = field(
        default=20,
        metadata={"help": "W: how many past accepted energy increments form the running mean/std (paper: 20)."},
    )
    """W of Appendix G.2: how many past accepted increments Δg form μ_t and σ_t; gating starts once full."""

    dgg_history: str = field(
        default="all",
        metadata={"help": "Which accepted increments enter the window: 'all' (paper), 'reuse' (only k > 1) or 'same_k' (one window per k)."},
    )
    """Which accepted increments enter the window: ``"all"`` (the paper's rule) or ``"reuse"`` (only k > 1), or
    ``"same_k"`` (one window per reuse index k; a step is scored against earlier steps at the same k)."""

    dgg_tied: str = field(
        default="output",
        metadata={"help": "How LMHeadGradProbe reads a tied lm_head/embedding gradient (see dgg.LMHeadGradProbe)."},
    )
    """How :class:`dgg.LMHeadGradProbe` reads the gradient of an lm_head tied to the input embedding."""

    dgg_rule: str = field(
        default="dgg",
        metadata={"help": "Reuse rule (dgg.reuse_rules): dgg, kl, clip, m2, nosignal, none, or a '+' combination."},
    )
    """Which reuse rule decides (see ``dgg.reuse_rules``): ``dgg`` (the paper's gate, default), ``kl``
    (SB3's target_kl), ``clip``, ``m2``, ``nosignal``, ``none``, or a combination such as ``dgg+nosignal``."""

    dgg_target_kl: float = field(default=0.02, metadata={"help": "kl rule: stop when approx KL > 1.5 x this."})
    """kl rule: stop reusing when the step's approximate KL to π_old exceeds 1.5 × this (SB3)."""
    dgg_kl_estimator: str = field(default="k3", metadata={"help": "kl rule: k3 (SB3) or k1 (Spinning Up)."})
    """kl rule: ``k3`` = mean((r − 1) − log r) or ``k1`` = mean(log π_old − log π_θ)."""
    dgg_target_clip: float = field(default=0.2, metadata={"help": "clip rule: stop above this clipped share."})
    """clip rule: stop when more than this share of the step's tokens is clipped."""
    dgg_target_m2: float = field(default=0.04, metadata={"help": "m2 rule: stop when mean((log r)^2) exceeds this."})
    """m2 rule: stop when mean((log r)²) over the step's tokens exceeds this."""
    dgg_signal_floor: float = field(default=1e-3, metadata={"help": "nosignal rule: relative energy floor at k > 1."})
    """nosignal rule: drop a reuse step whose energy is below this × the batch's first energy."""
    dgg_gradnorm_window: int = field(default=128, metadata={"help": "gradnorm rule: previous norms in the window."})
    """gradnorm rule: previous global gradient norms forming its mean and std (OLMo-core's default 128)."""
    dgg_gradnorm_sigma: float = field(default=6.0, metadata={"help": "gradnorm rule: skip beyond this many std."})
    """gradnorm rule: drop a step more than this many standard deviations from the mean (OLMo-core: 6)."""
    dgg_fresh_drop: str = field(
        default="end_batch",
        metadata={"help": "A drop on fresh data (first pass): 'end_batch' regenerates; 'skip_step' skips it alone."},
    )
    """What a drop on fresh data (k = 1, the first pass over a generation batch) does: ``end_batch`` (default)
    goes to the next generation, leaving the batch's remaining fresh steps unused; ``skip_step`` drops that
    optimizer step alone and goes on with the batch. A drop during reuse (k > 1) always ends the batch."""

    dgg_watch_only: bool = field(
        default=False,
        metadata={"help": "Apply every step as stock GRPOTrainer would; log what the rule would have done."},
    )
    """Watch mode: every step is applied exactly as by ``GRPOTrainer``; each step's signals and the rule's answer
    (``reuse/would_stop``, ``reuse/would_stop_reason``) are logged, so a rule can be screened on a real run."""

    def rule_settings(self) -> RuleSettings:
        return RuleSettings(tau=self.dgg_tau, window=self.dgg_window, history=self.dgg_history,
                            target_kl=self.dgg_target_kl, kl_estimator=self.dgg_kl_estimator,
                            target_clip=self.dgg_target_clip, target_m2=self.dgg_target_m2,
                            signal_floor=self.dgg_signal_floor, gradnorm_window=self.dgg_gradnorm_window,
                            gradnorm_sigma=self.dgg_gradnorm_sigma, fresh_drop=self.dgg_fresh_drop)

    def __post_init__(self):
        super().__post_init__()  # derives steps_per_generation, which the check below needs
        if not isinstance(self.dgg_enabled, bool):
            raise ValueError(f"dgg_enabled must be True or False (got {self.dgg_enabled!r})")
        check_gate_settings(self.dgg_tau, self.dgg_window, self.dgg_history, prefix="dgg_")
        _validate_tied(self.dgg_tied)
        parse_rule_names(self.dgg_rule)  # raises, listing the valid names
        if self.dgg_kl_estimator not in KL_STOP_SIGNALS:
            raise ValueError(f"dgg_kl_estimator must be one of {tuple(KL_STOP_SIGNALS)} (got {self.dgg_kl_estimator!r})")
        try:
            check_fresh_drop(self.dgg_fresh_drop)
        except ValueError as err:
            raise ValueError(f"dgg_{err}") from None
        self.rule_settings()  # validates the thresholds through the rules' own checks
        make_rule(self.dgg_rule, self.rule_settings())
        if self.dgg_enabled and self.steps_per_generation % self.gradient_accumulation_steps != 0:
            raise ValueError(
                f"DGG needs steps_per_generation ({self.steps_per_generation}) to be a multiple of "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}), so that each optimizer step "
                "lies inside one pass over the generation batch and has a single reuse index k. Leave both "
                "steps_per_generation and generation_batch_size unset (TRL then uses one generation batch per "
                "optimizer step), or set dgg_enabled=False."
            )


def _validate_tied(tied: object) -> None:
    # The probe owns the list of tied-head modes; use it when it publishes one.
    try:
        from dgg import probe
    except ImportError:
        probe = None
    allowed = getattr(probe, "TIED_MODES", None)
    if not isinstance(tied, str) or not tied or (allowed is not None and tied not in allowed):
        raise ValueError(f"dgg_tied must be one of {allowed or 'the modes of dgg.LMHeadGradProbe'} (got {tied!r})")


class DGGGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with Dynamic Gradient Gating of its sample reuse (paper Algorithm 1).

    Takes exactly the arguments of ``GRPOTrainer``; ``args`` must be a :class:`DGGGRPOConfig` (or ``None``
    for its defaults). With ``dgg_enabled=False`` it is the stock trainer, step for step.

    The gate is read in :meth:`training_step`, the one hook of ``transformers.Trainer`` that runs after the
    backward of every micro-step and before gradient clipping and ``optimizer.step()`` (both happen in the
    training loop right after it returns). On the synchronising micro-step (``accelerator.sync_gradients``)
    the gradients are complete: accumulated over ``gradient_accumulation_steps`` and, under DDP, all-reduced.
    TRL callbacks (``on_pre_optimizer_step``) come after clipping, so they cannot see g_t unclipped.

    Attributes:
        dgg_rule: the reuse rule (:func:`dgg.reuse_rules.make_rule` of ``args.dgg_rule``); ``None`` when disabled.
        dgg_gate: the paper's :class:`dgg.GradientGate` inside that rule; ``None`` when disabled or not used.
        dgg_last_decision: the :class:`dgg.reuse_rules.Verdict` of the latest optimizer step.
        dgg_last_signals: the :class:`dgg.reuse_rules.AttemptSignals` it was decided on.
    """

    def __init__(self, model, reward_funcs=None, args: DGGGRPOConfig | None = None, *positional, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = DGGGRPOConfig(f"{str(model_name).rstrip('/').split('/')[-1]}-GRPO-DGG")
        if not isinstance(args, DGGGRPOConfig):
            raise TypeError(
                f"DGGGRPOTrainer needs args=DGGGRPOConfig(...), got {type(args).__name__}; DGGGRPOConfig takes "
                "every GRPOConfig argument plus dgg_enabled, dgg_tau, dgg_window, dgg_history and dgg_tied."
            )
        super().__init__(model, reward_funcs, args, *positional, **kwargs)
        self.dgg_stop = STOP  # SIGTERM/SIGINT during train(): save a checkpoint at the step's end, stop
        self.add_callback(_SaveAndStopOnSignal(self.dgg_stop))
        self.dgg_controller: ReuseController | None = None
        self.dgg_gate: GradientGate | None = None
        self.dgg_rule = None
        self.dgg_last_verdict: StepVerdict | None = None
        self._dgg_probe = None
        if not args.dgg_enabled:
            return
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        _refuse_unsupported_distribution(self.accelerator.distributed_type, getattr(plugin, "fsdp_version", None))
        agree = torch_distributed(device=self.accelerator.device) if self.accelerator.num_processes > 1 else None
        self.dgg_controller = ReuseController(args.dgg_rule, args.rule_settings(), watch_only=args.dgg_watch_only,
                                              **({"agree": agree} if agree else {}))
        self.dgg_rule = self.dgg_controller.rule
        dgg = self.dgg_rule.find("dgg")
        self.dgg_gate = dgg.gate if dgg is not None else None

    @property
    def dgg_last_decision(self) -> StepVerdict | None:  # the name this attribute had before the controller
        return self.dgg_last_verdict

    @property
    def dgg_last_signals(self) -> AttemptSignals | None:
        return self.dgg_last_verdict.signals if self.dgg_last_verdict is not None else None

    # ---- the gate, once per optimizer step -------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)  # forward + backward; TRL's _step += 1
        if self.dgg_rule is not None and self.accelerator.sync_gradients:
            self._gate_optimizer_step(model)
        return loss

    def _compute_loss(self, model, inputs):
        """TRL's loss, plus the ratio statistics of this micro-step for the rules (log π_θ is captured from the
        forward TRL runs anyway; nothing is recomputed)."""
        if self.dgg_rule is None:
            return super()._compute_loss(model, inputs)
        captured = []
        forward = self._get_per_token_logps_and_entropies

        def capture(*args, **kwargs):
            out = forward(*args, **kwargs)
            captured.append(out[0])
            return out

        self._get_per_token_logps_and_entropies = capture
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            del self._get_per_token_logps_and_entropies  # back to the class's method
        if captured:
            self._accumulate_ratio_statistics(captured[0].detach(), inputs)
        return loss

    def _accumulate_ratio_statistics(self, logps, inputs) -> None:
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        old = inputs.get("old_per_token_logps")
        old = logps if old is None else old  # TRL skips π_old when it equals π_θ (one pass per batch)
        stats = ratio_statistics(logps, old, inputs["advantages"], mask, self.args.epsilon,
                                 getattr(self.args, "epsilon_high", None))
        self.dgg_controller.add_micro_batch(stats, float(mask.sum()), bool(inputs["advantages"].abs().max() > 0))

    def _gate_optimizer_step(self, model) -> None:
        """Algorithm 1, lines 5–9, between the last backward and the optimizer of one optimizer step."""
        reuse_index = reuse_index_of_step(self._step, self.args.steps_per_generation, self.num_iterations)
        energy = self._lm_head_grad_energy()
        self._dgg_probe.reset()
        verdict = self.dgg_controller.decide(reuse_index, energy, _pre_clip_grad_norm(model))
        if not verdict.apply:
            # Gradient discard: with every .grad None, clipping sees nothing and AdamW skips every parameter,
            # so its moments and step counts are untouched. The LR scheduler and global_step still advance.
            model.zero_grad(set_to_none=True)
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None and scaler.is_enabled():
                skip_scaled_optimizer_step(self.optimizer, scaler)
        if verdict.stop:
            # Reuse termination: TRL regenerates when _step reaches a multiple of steps_per_generation * K.
            self._step = next_generation_boundary(self._step, self.args.steps_per_generation, self.num_iterations)
        self.dgg_last_verdict = verdict
        self._log_verdict(verdict)

    def _lm_head_grad_energy(self) -> float:
        """g_t = ‖G_lm‖²_F of the gradient the optimizer would apply, identical on every process."""
        energy = self._dgg_probe.energy().detach().float()
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # fp16: grads are still multiplied by the loss scale
            energy = energy / float(scaler.get_scale()) ** 2
        if self.accelerator.num_processes > 1:
            # All-reduced DDP grads give every rank the same value already; taking rank 0's makes agreement
            # structural, since one rank discarding alone would desynchronise the replicas.
            energy = broadcast(energy.to(self.accelerator.device).reshape(1), from_process=0)
        return float(energy.reshape(()).item())

    def _log_verdict(self, verdict: StepVerdict) -> None:
        # dgg's vocabulary (docs/metrics.md), numbers only: GRPOTrainer.log averages each key over the logging
        # interval (reuse/stop becomes the stop rate); the running counters keep their latest value.
        metrics = self._metrics["train"]
        for key, value in verdict.numeric_metrics().items():
            metrics[key].append(value)
        if self.dgg_gate is not None:
            for name, count in self.dgg_gate.counters().items():
                metrics[name] = [float(count)]
        for reason, count in self.dgg_rule.stops_by_reason.items():
            metrics[f"reuse/stops_{reason.replace(':', '_')}"] = [float(count)]

    # ---- checkpoints carry the gate's statistics --------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.dgg_controller is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            with open(os.path.join(folder, STATE_FILE), "w") as file:
                json.dump(self.dgg_controller.state_dict(), file)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.dgg_controller is None or checkpoint is None:
            return
        if os.path.exists(path := os.path.join(checkpoint, STATE_FILE)):
            with open(path) as file:
                self.dgg_controller.load_state_dict(json.load(file))
        elif os.path.exists(path := os.path.join(checkpoint, GATE_STATE_FILE)):  # written before the controller
            with open(path) as file:
                saved = json.load(file)
            if "reuse_rule" in saved:
                self.dgg_rule.load_state_dict(saved["reuse_rule"])
            elif self.dgg_gate is not None:  # written before reuse rules: the gate's state alone
                self.dgg_gate.load_state_dict(saved)

    def train(self, *args, **kwargs):
        # The probe lives for one train() call, so no hook outlasts training.
        if self.dgg_controller is not None:
            from dgg import LMHeadGradProbe

            self._dgg_probe = LMHeadGradProbe(self.model, tied=self.args.dgg_tied)
        try:
            with stop_signals():
                output = super().train(*args, **kwargs)
        finally:
            if self._dgg_probe is not None:
                self._dgg_probe.close()
                self._dgg_probe = None
        if self.dgg_stop.requested:
            raise RunStopped(self.dgg_stop.signum, self.args.output_dir,
                             f"stopped by {self.dgg_stop.name} after optimizer step {self.state.global_step}; "
                             f"checkpoint-{self.state.global_step} (with {GATE_STATE_FILE}) saved in "
                             f"{self.args.output_dir}; continue with trainer.train(resume_from_checkpoint=True)")
        return output


class _SaveAndStopOnSignal(TrainerCallback):
    """After a stop signal, the optimizer step in flight completes; then Trainer saves a checkpoint (the rule's
    state with it) and ends training, as PyTorch Lightning and Accelerate do on SIGTERM."""

    def __init__(self, flag: StopFlag):
        self.flag = flag

    def on_step_end(self, args, state, control, **kwargs):
        if self.flag.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


def _pre_clip_grad_norm(model) -> float:
    """The global gradient norm before clipping (what the gradnorm rule reads), gradients left untouched; the
    same on every process (gradients are all-reduced by now; sharded ones are reduced by ``get_total_norm``)."""
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    norm = total_norm(grads) if total_norm is not None else \
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def skip_scaled_optimizer_step(optimizer, scaler) -> None:
    """Make the coming ``optimizer.step()`` a no-op that still closes the GradScaler's iteration.

    Under fp16 loss scaling a discard leaves every gradient None, and ``GradScaler.step`` then raises "No inf
    checks were recorded for this optimizer". Skipping the step keeps AdamW untouched, as without a scaler;
    ``update(new_scale=current)`` clears what ``unscale_`` (from gradient clipping) recorded, keeps the scale,
    and is the scaler's public way to end an iteration without an inf check. The LR scheduler still steps."""
    def skipped(*args, **kwargs):
        del optimizer.step  # the class's own step again from the next call on
        scaler.update(new_scale=scaler.get_scale())

    optimizer.step = skipped


def _refuse_unsupported_distribution(distributed_type: DistributedType, fsdp_version: int | None = None) -> None:
    if distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            "DGGGRPOTrainer does not support DeepSpeed: its engine steps the optimizer inside backward(), so there "
            "is no point between the gradient and the optimizer where the gate could discard, and ZeRO-2/3 "
            "partition the lm_head gradient across ranks. Use DDP (plain accelerate launch), or set "
            "dgg_enabled=False."
        )
    if distributed_type == DistributedType.FSDP and fsdp_version != 2:
        raise ValueError(
            "DGGGRPOTrainer does not support FSDP version 1: each rank holds a flat shard of the lm_head gradient "
            "outside a DTensor, so the probe would read the local shard's energy only and gate on a wrong number. "
            "Use DDP, or FSDP2 (fsdp_version: 2, untested), or set dgg_enabled=False."
        )
    if distributed_type in (DistributedType.FSDP, DistributedType.XLA, DistributedType.MEGATRON_LM):
        warnings.warn(
            f"DGGGRPOTrainer is untested under {distributed_type.value}; the gradient energy is only correct if "
            "dgg.LMHeadGradProbe reads the full (unsharded) lm_head gradient there.",
            stacklevel=3,
        )

