"""The reference GRPO trainer with sample reuse: single-use, fixed-K and DGG (paper Algorithm 1).

Read :meth:`GRPOTrainer.train`, :meth:`GRPOTrainer.reuse` and :meth:`GRPOTrainer.update` top to bottom:
they are Algorithm 1's lines 1–12. Everything numeric lives in small modules: ``algos`` (advantages and the
loss), ``rollout`` (sampling, log-probs), ``reuse_rules`` and ``gate`` (Eq. 8), ``probe`` (g_t), ``profiler``
(Fig. 1); ``loading`` loads models, ``run_io`` keeps run state and metrics, ``trainer_checkpoint`` saves and
restores the trainer; ``scoring`` rewards a batch, ``evaluation`` measures held-out accuracy, ``reuse`` holds the
per-attempt decision, ``diagnostics`` reads the training forward. ``launch.train`` starts or resumes a run.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from pathlib import Path

import torch

from dgg.agents.episodes import episode_statistics
from dgg.config import Config, ConfigError, make_objective, save_config
from dgg.diagnostics import MicroBatchForward, observers_for
from dgg.evaluation import held_out_accuracy
from dgg.host_memory import return_freed_memory
from dgg.loading import has_active_dropout, load_policy
from dgg.precision import autocast, bf16_warning, resolve_precision
from dgg.preemption import STOP, stop_signals
from dgg.probe import LMHeadGradProbe, global_grad_norm
from dgg.profiler import WeightChangeProfiler
from dgg.reuse.controller import ReuseController, StepVerdict, finite_or_none
from dgg.reuse.statistics import ratio_statistics
from dgg.rewards import task_for_run
from dgg.rollout import (
    RolloutBatch,
    batch_metrics,
    completion_logprobs,
    mini_batches,
    render_prompt,
    score_before_updates,
    token_entropy,
)
from dgg.run_environment import describe_environment, machine_threads, record_start
from dgg.run_io import (
    CHECKPOINT,
    MetricsWriter,
    RunState,
    prepare_fresh_run_dir,
)
from dgg.run_lock import lock_or_refuse, unlock
from dgg.samplers import sampler_for_run
from dgg.scoring import BatchScorer
from dgg.trainer_checkpoint import Checkpointing

log = logging.getLogger("dgg.trainer")

# --- the trainer ---------------------------------------------------------------------------------------------

class GRPOTrainer(Checkpointing):
    """GRPO with single-use, fixed-K or DGG-gated reuse of each rollout batch (Algorithm 1)."""

    def __init__(self, config: Config, model=None, tokenizer=None, task=None, resume_from: Path | None = None):
        self.config = config
        self.run_dir = Path(config.output.dir)
        lock_or_refuse(self.run_dir)  # one writer per run directory, before anything in it changes
        self._holds_lock = True
        try:
            self._build(config, model, tokenizer, task, resume_from)
        except BaseException:
            self._release_lock()
            raise

    def _build(self, config: Config, model, tokenizer, task, resume_from: Path | None) -> None:
        if resume_from is None:  # before anything slow: a typo must not cost a model load, nor a run
            prepare_fresh_run_dir(self.run_dir, config.output.overwrite)
        if config.train.threads or torch.get_num_threads() > machine_threads():  # never oversubscribe the cores
            torch.set_num_threads(config.train.threads or machine_threads())
        if config.train.return_freed_memory:
            return_freed_memory()  # before the model loads: from then on freed blocks go back to the system
        random.seed(config.train.seed)
        torch.manual_seed(config.train.seed)

        weights_from = str(resume_from / CHECKPOINT) if resume_from is not None else None
        if model is None:
            model, tokenizer = load_policy(config.model, weights_from)
        self.model, self.tokenizer = model, tokenizer
        if config.train.activation_checkpointing:  # transformers checkpoints only in train mode
            if has_active_dropout(model):
                raise ConfigError("train.activation_checkpointing trains in train mode, which would switch this "
                                  "model's dropout on; set its dropout to 0 or turn checkpointing off")
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            model.train()  # sampling and scoring still switch to eval mode and back
        self.device = next(model.parameters()).device
        self.task = task_for_run(config, tokenizer, task)
        self.chat = getattr(config.task, "prompt_format", "bare") == "chat"
        config.train.precision = resolve_precision(config.train.precision, self.device)  # saved resolved
        self.precision = config.train.precision
        if (slow := bf16_warning(self.device, self.precision)) is not None:
            log.warning(slow)
        # π_old is the policy before the batch's first update, so that update's own forward yields log π_old
        # for free — unless mini-batches update in between, or dropout makes train and eval forwards differ.
        self.episodic = bool(getattr(self.task, "is_environment", False))  # each rollout an episode
        self.sampler = sampler_for_run(config, model, tokenizer, self.task, self.chat)
        self.objective = make_objective(config)
        # The KL penalty in the reward is computed from π_old before the first update, so π_old is scored first.
        kl_in_reward = config.algo.kl_coef > 0 and config.algo.kl_in == "reward"
        self.old_from_first_update = config.reuse.mini_batches == 1 and not has_active_dropout(model) \
            and not kl_in_reward

        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.optim.lr, betas=config.optim.betas,
                                           weight_decay=config.optim.weight_decay)
        self.reference = None
        if config.algo.kl_coef > 0:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

        # The reuse decision, the same object TRL and verl call (dgg.reuse): the paper's gate by default in dgg
        # mode; without a dgg rule the gate still watches at τ = ∞, so its z-scores are logged in every mode.
        self.controller = ReuseController(config.reuse.rule_spec, config.reuse.rule_settings())
        self.rule, self.gate = self.controller.rule, self.controller.gate
        self.probe = LMHeadGradProbe(model, tied=config.reuse.tied)
        self.profiler = WeightChangeProfiler(model, config.profile.snapshot_on_cpu) \
            if config.profile.weights_every else None
        self.state = RunState()
        self._clock = time.perf_counter()
        self.observers = observers_for(config, model, self.objective)  # they read the training forward
        full_logits = [o for o in self.observers if not o.works_chunked]
        if config.train.logprob_chunk and (full_logits or self.objective.needs_entropy):
            raise ConfigError("train.logprob_chunk never holds the full logits, which profile.theorem2 and an "
                              "entropy-based algo.token_credit read; turn those off, or set train.logprob_chunk=0")
        self._paused_seconds = 0.0  # diagnostic time inside the current tick, kept off the training clock
        self._sampled_ids: list[torch.Tensor] = []
        self._last_checkpoint_time = time.monotonic()
        self._last_checkpoint_batch = -1
        self.stop = STOP  # set by the first SIGTERM/SIGINT while train() (or a dgg command) runs
        self._pending: tuple[RolloutBatch, tuple[int, int]] | None = None  # a batch a stop interrupted
        self._mini_batch: dict = {}  # which mini-batch of the pass the current attempt trains on

        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / "metrics.jsonl"
        self._reward_errors_path = self.run_dir / "reward_errors.jsonl"
        self.scorer = BatchScorer(self.task, config.task, self._reward_errors_path, self.run_dir, self.device)
        if resume_from is not None:
            self._load_checkpoint(resume_from / CHECKPOINT, metrics_path)
            if self.state.batch > config.train.max_batches:
                raise ConfigError(f"train.max_batches={config.train.max_batches}, but {resume_from} already "
                                  f"trained {self.state.batch} batches; give a larger train.max_batches to continue")
        else:
            save_config(config, self.run_dir / "config.yaml")
        self.metrics = MetricsWriter(metrics_path, self.run_dir / "tensorboard" if config.output.tensorboard else None)

    # Algorithm 1, line 1: for each training iteration
    def train(self) -> RunState:
        cfg = self.config
        if not self._holds_lock:  # train() called again after it returned
            lock_or_refuse(self.run_dir)
            self._holds_lock = True
        progress = _progress_bar(cfg.train.max_batches, self.state.batch - (self._pending is not None),
                                 cfg.output.progress)
        record_start(self.run_dir, self.state.batch - (self._pending is not None),
                     describe_environment(self.device, self.precision))  # where this stretch of the run trains
        self._clock = time.perf_counter()
        try:
            with stop_signals():
                self._train_batches(progress)
        finally:
            progress.close()
            self.metrics.close()
            self.probe.close()
            self._release_lock()
        return self.state

    def _train_batches(self, progress) -> None:
        cfg = self.config
        if self.state.batch == 0:
            self.evaluate()
        while self._pending is not None or self.state.batch < cfg.train.max_batches:
            if self._pending is not None:  # resumed inside the batch a stop signal interrupted
                (batch, start), self._pending = self._pending, None
            else:
                self._stop_if_requested()
                batch, start = self.collect_rollouts(), (1, 0)  # line 2; its records carry its 1-based number
            reuse_count = self.reuse(batch, start)  # lines 3–12
            self._log_rollout(batch, reuse_count)
            if cfg.eval.every and (self.state.batch % cfg.eval.every == 0
                                   or self.state.batch == cfg.train.max_batches):
                self.evaluate()
            if cfg.profile.c_struct_every and self.state.batch % cfg.profile.c_struct_every == 0:
                self.measure_c_struct()
            if self._checkpoint_due():
                self.save_checkpoint()
            progress.update(1)
            progress.set_postfix(reward=f"{float(batch.rewards.mean()):.2f}", reuse=reuse_count,
                                 discards=self.gate.discards_by_reason.get("zscore", 0))
        if self._last_checkpoint_batch != self.state.batch:
            self.save_checkpoint()
        if self.state.bound_violations:
            log.warning("Theorem 2's bound was exceeded on %d updates (theory/bound_violations)",
                        self.state.bound_violations)

    def _release_lock(self) -> None:
        if self._holds_lock:
            unlock(self.run_dir)
            self._holds_lock = False

    # Algorithm 1, line 2: generate a rollout batch from π_old ← π_θ
    def collect_rollouts(self) -> RolloutBatch:
        cfg = self.config
        problems = [render_prompt(self.tokenizer, self.task.problem("train", self.state.data_position + i), self.chat)
                    for i in range(cfg.rollout.prompts_per_batch)]
        self.state.data_position += cfg.rollout.prompts_per_batch
        self.state.batch += 1
        batch = self.sampler.sample(problems, cfg.rollout.group_size, cfg.rollout.max_new_tokens,
                                    cfg.rollout.temperature, cfg.rollout.top_p)
        self.state.rollouts += batch.size
        if self.profiler is not None:  # which lm_head rows this batch sampled (weights/lm_head_sampled)
            completions = batch.input_ids[:, batch.prompt_length:]
            self._sampled_ids.append(torch.unique(completions[batch.completion_mask > 0]).cpu())
        score_before_updates(batch, self.model, self.reference, not self.old_from_first_update,
                             cfg.rollout.temperature, cfg.train.micro_batch_size, self.precision,
                             cfg.train.logprob_chunk)
        self._score_rewards(batch)
        return batch

    def _score_rewards(self, batch: RolloutBatch) -> None:
        self.scorer.score(batch, self.state)
        kl_penalty = None
        if batch.reference_logprobs is not None and batch.old_logprobs is not None:
            kl_penalty = self.objective.sequence_kl(batch.old_logprobs, batch.reference_logprobs,
                                                    batch.completion_mask)
        batch.advantages = self.objective.advantages(batch.rewards, self.config.rollout.group_size, kl_penalty)

    # Algorithm 1, lines 3–12: for k = 1..K, update unless the gate says stop
    def reuse(self, batch: RolloutBatch, start: tuple[int, int] = (1, 0)) -> int:
        """Returns how many passes over the batch ran to their end (a pass with a step skipped under
        ``reuse.fresh_drop=skip_step`` counts). ``start`` (pass, mini-batch) resumes a batch that a stop signal
        interrupted; a stop signal ends it between two attempts."""
        cfg = self.config.reuse
        for reuse_index in range(start[0], cfg.passes + 1):
            for position, (rows, mini_batch) in enumerate(self._mini_batches(batch, reuse_index)):
                if (reuse_index, position) < start:
                    continue
                self._stop_if_requested(batch, (reuse_index, position))
                # Which rows this update trains on, so that pass k is comparable with pass 1 on the same samples.
                self._mini_batch = {"mini_batch": position, "mini_batch_rows": rows} if rows is not None else {}
                if not self.update(mini_batch, reuse_index):
                    return reuse_index - 1  # discard & terminate reuse (line 8)
        return cfg.passes

    def _mini_batches(self, batch: RolloutBatch, reuse_index: int) -> list[tuple[list[int] | None, RolloutBatch]]:
        cfg = self.config
        drawn_for = 1 if cfg.reuse.mini_batch_order == "fixed" else reuse_index  # fixed: pass 1's partition
        return mini_batches(batch, cfg.reuse.mini_batches, (cfg.train.seed, self.state.batch, drawn_for))

    def update(self, batch: RolloutBatch, reuse_index: int) -> bool:
        """One update attempt (lines 4–11). Returns False when the reuse of this batch must end."""
        started = time.perf_counter()
        self.state.attempts += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.probe.reset()
        observers = [o for o in self.observers if o.begin(self.state.attempts)]
        loss = self._backward(batch, observers)  # line 4, its statistics handed to the controller

        if not math.isfinite(loss):
            return self._skip(self.controller.abandon(reuse_index, "non_finite_loss"), {}, loss, started)
        gate_started = time.perf_counter()
        energy = float(self.probe.energy())  # line 5: g_t, read before any clipping
        grad_norm = global_grad_norm(self.optimizer)
        verdict = self.controller.decide(reuse_index, energy, grad_norm)  # line 6: the rule decides
        gate_seconds = time.perf_counter() - gate_started  # the whole cost of DGG per update
        diagnostics = self._observe(observers, "finish", energy)
        if verdict.reason == "non_finite_grad":
            return self._skip(verdict, diagnostics, loss, started)
        diagnostics["perf/gate_seconds"] = gate_seconds
        if "theory/bound_violations" in diagnostics:  # Theorem 2: a violation is counted, never hidden
            self.state.bound_violations += int(diagnostics.pop("theory/bound_violations"))
            diagnostics["theory/bound_violations"] = self.state.bound_violations
        if not verdict.apply:  # line 7
            return self._skip(verdict, diagnostics, loss, started)

        if self.config.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self._params(), self.config.optim.grad_clip)
        self.optimizer.step()  # line 10
        self.sampler.policy_changed()
        self.optimizer.zero_grad(set_to_none=True)
        self.probe.reset()
        self.state.updates += 1
        self._log_update(verdict, diagnostics, loss, started)
        if self.profiler and self.state.updates % self.config.profile.weights_every == 0:
            sampled = torch.unique(torch.cat(self._sampled_ids)) if self._sampled_ids else None
            self._sampled_ids = []
            changes = self.profiler.measure(sampled)
            self.metrics.write("weights", self.state, {"update": self.state.updates,
                                                       **{f"weights/{c}": v for c, v in changes.items()}})
        return True

    def _backward(self, batch: RolloutBatch, observers: list) -> float:
        """Loss of Eq. 1 over the batch's T active tokens, back-propagated in micro-batches; each micro-batch's
        ratio statistics go to the controller and its forward to the observers. Returns the loss."""
        cfg = self.config
        total_tokens = float(batch.completion_mask.sum().clamp(min=1.0))
        # Aggregation weights come from the whole batch, so micro-batches add up to it exactly.
        weights, norms = self.objective.token_weights(batch.completion_mask, cfg.rollout.group_size,
                                                      cfg.agent.max_episode_tokens if self.episodic
                                                      else cfg.rollout.max_new_tokens)
        total_norm = float(norms.sum())
        size = cfg.train.micro_batch_size or batch.size
        first_pass = batch.old_logprobs is None  # π_θ = π_old here: this forward scores π_old
        need_logits = bool(observers) or self.objective.needs_entropy
        old_chunks = []
        loss_sum = 0.0
        for start in range(0, batch.size, size):
            rows = slice(start, start + size)
            mask = batch.completion_mask[rows]
            share = float(norms[rows].sum()) / total_norm if total_norm else 0.0  # of the batch's aggregate
            with autocast(self.device, self.precision):
                scored = completion_logprobs(self.model, batch.input_ids[rows], batch.attention_mask[rows],
                                             batch.prompt_length, cfg.rollout.temperature,
                                             return_logits=need_logits, chunk=cfg.train.logprob_chunk)
            logprobs, logits, hidden = scored if need_logits else (scored, None, None)
            old_logprobs = logprobs.detach() if first_pass else batch.old_logprobs[rows]
            old_chunks.append(old_logprobs)
            self._observe(observers, "micro_batch", MicroBatchForward(
                hidden, logits, batch.input_ids[rows, batch.prompt_length:], logprobs.detach() - old_logprobs,
                batch.advantages[rows], mask, total_tokens, self.model.get_output_embeddings()))
            entropy = token_entropy(logits, cfg.rollout.temperature) if self.objective.needs_entropy else None
            del logits, hidden
            loss, extras = self.objective.loss_of(
                logprobs, old_logprobs, batch.advantages[rows], mask, weights[rows], norms[rows],
                batch.reference_logprobs[rows] if self.reference is not None else None, entropy)
            stats = {**ratio_statistics(logprobs.detach(), old_logprobs, batch.advantages[rows], mask,
                                        cfg.algo.clip_eps, cfg.algo.clip_eps_high), **extras}
            if not torch.isfinite(loss):
                return math.nan
            (loss * share).backward()
            loss_sum += float(loss.detach()) * share
            self.controller.add_micro_batch(stats, float(mask.sum()), bool(batch.advantages[rows].abs().max() > 0))
        if first_pass:
            batch.old_logprobs = torch.cat(old_chunks)
        return loss_sum

    def _observe(self, observers: list, method: str, *args) -> dict[str, float]:
        """Call ``method`` on every observer, keeping the time of off-clock ones off the training clock."""
        out: dict[str, float] = {}
        for observer in observers:
            started = time.perf_counter()
            out.update(getattr(observer, method)(*args) or {})
            if observer.off_clock:
                self._paused_seconds += time.perf_counter() - started
        return out

    def _skip(self, verdict: StepVerdict, diagnostics: dict, loss: float, started: float) -> bool:
        """Drop this update's gradient before the optimizer: AdamW's moments and step count stay untouched.
        Returns whether the batch goes on (a fresh step skipped under ``reuse.fresh_drop=skip_step``)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.probe.reset()
        if verdict.reason in ("non_finite_loss", "non_finite_grad"):
            self.state.nonfinite_skips += 1
        self._log_update(verdict, diagnostics, loss, started)
        return not verdict.stop

    def _params(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _tick(self) -> None:
        """Advance the training clock; evaluation, checkpointing and the optional energy-split diagnostic run
        with the clock stopped, so that wall-clock speedups compare training alone."""
        now = time.perf_counter()
        self.state.wall_time += now - self._clock - self._paused_seconds
        self._clock, self._paused_seconds = now, 0.0

    def _log_update(self, verdict: StepVerdict, diagnostics: dict, loss: float, started: float) -> None:
        self._tick()
        self.metrics.write("update", self.state, {
            **verdict.metrics(),  # the vocabulary TRL and verl log too (docs/metrics.md)
            **self._mini_batch,
            "update": self.state.updates,
            "actor/pg_loss": finite_or_none(loss),
            **{(k if "/" in k else f"actor/{k}"): v for k, v in diagnostics.items()},
            "actor/nonfinite_skips": self.state.nonfinite_skips,
            "perf/update_seconds": time.perf_counter() - started,
        })

    def _log_rollout(self, batch: RolloutBatch, reuse_count: int) -> None:
        self._tick()
        self.metrics.write("rollout", self.state, {
            **batch_metrics(batch, self.config.rollout.group_size, self.state.reward_errors),
            "gate/reuse_count": reuse_count,
            "gate/discards": self.gate.discards_by_reason.get("zscore", 0),
            "reuse/stops": sum(self.rule.stops_by_reason.values()),
            "actor/updates": self.state.updates,
            **(episode_statistics(batch) if self.episodic else {}),
        })

    def evaluate(self) -> float | None:
        """Held-out accuracy (dgg.evaluation), with the training clock stopped."""
        cfg = self.config
        if not cfg.eval.every:
            return None
        self._tick()
        started = time.perf_counter()
        accuracy, count = held_out_accuracy(self.sampler, self.task, self.tokenizer, self.chat, cfg,
                                            cfg.train.seed * 1_000_003 + self.state.batch, self.device)
        self.metrics.write("eval", self.state, {"eval/accuracy": accuracy, "eval/samples": cfg.eval.samples,
                                                "eval/problems": count,
                                                "perf/eval_seconds": time.perf_counter() - started})
        self._clock = time.perf_counter()
        return accuracy

    def measure_c_struct(self) -> None:
        """Fig. 6: the 95th-percentile C_struct on a fixed probe set of held-out prompts (clock stopped)."""
        from dgg.theory import c_struct_p95, encode_probe_texts

        self._tick()
        texts = [self.task.problem("test", i).prompt + self.task.problem("test", i).answer for i in range(16)]
        probe_ids = encode_probe_texts(self.tokenizer, texts, device=self.device)
        values = c_struct_p95(self.model, probe_ids, tokens=self.config.profile.c_struct_tokens,
                              seed=self.config.train.seed)
        self.metrics.write("theory", self.state, {f"theory/{k}": v for k, v in values.items()})
        self._clock = time.perf_counter()


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="batches", unit="batch", disable=not enabled, dynamic_ncols=True)
