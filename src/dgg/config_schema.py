"""The fields of a training run's configuration: one typed dataclass per section (``model``, ``task``,
``rollout``, ``algo``, ``optim``, ``reuse``, ``train``, ``agent``, ``eval``, ``profile``, ``output``), a docstring
per field, and checks that name the field and what is allowed. Loading them from YAML and overrides:
``dgg.config``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dgg.errors import UserError
from dgg.gate import check_gate_settings
from dgg.precision import PRECISIONS
from dgg.reuse.controller import FRESH_DROPS
from dgg.reuse_rules import KL_STOP_SIGNALS, RuleSettings, parse_rule_names
from dgg.tasks import TaskConfig

REUSE_MODES = ("single", "fixed", "dgg")


class ConfigError(UserError):
    """A configuration value or file that cannot be used; the message names the field."""


def _check(condition: bool, name: str, allowed: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{name} must be {allowed} (got {value!r})")


@dataclass
class ModelConfig:
    path: str = "default"
    """A local Hugging Face causal-LM directory, a hub name, or ``default`` for the embedded tiny model."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    strict_weights: bool = True
    """Refuse a checkpoint whose weights leave parameters randomly initialised or go unused (a model_type that
    does not match the weights); false allows it on purpose."""

    def __post_init__(self):
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", "float32, bfloat16 or float16",
               self.dtype)
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "model.device",
               "auto, cpu, cuda or cuda:N", self.device)


@dataclass
class RolloutConfig:
    prompts_per_batch: int = 32
    """Prompts per rollout batch (the paper's prompt batch size)."""
    group_size: int = 8
    """G, completions sampled per prompt for the group-normalised advantage."""
    max_new_tokens: int = 6
    """Longest completion, in tokens; sampling stops earlier at EOS."""
    temperature: float = 1.0
    """Sampling temperature; log-probs for the importance ratio use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    sampler: str = "hf"
    """Who generates: ``hf`` (``model.generate`` on the training model) or ``vllm`` (a colocated vLLM engine,
    weights pushed after each applied step; needs a GPU and ``pip install dgg[vllm]``). π_old is scored by the
    training model either way."""
    vllm_gpu_memory_utilization: float = 0.3
    """vllm only: the share of GPU memory the engine may take (the rest is the trainer's)."""

    def __post_init__(self):
        _check(self.prompts_per_batch >= 1, "rollout.prompts_per_batch", "an integer >= 1", self.prompts_per_batch)
        _check(self.group_size >= 2, "rollout.group_size", "an integer >= 2 (GRPO compares within a group)",
               self.group_size)
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "an integer >= 1", self.max_new_tokens)
        _check(self.temperature > 0 and math.isfinite(self.temperature), "rollout.temperature", "> 0",
               self.temperature)
        _check(0 < self.top_p <= 1, "rollout.top_p", "in (0, 1]", self.top_p)
        _check(self.sampler in ("hf", "vllm"), "rollout.sampler", "hf or vllm", self.sampler)
        _check(0 < self.vllm_gpu_memory_utilization < 1, "rollout.vllm_gpu_memory_utilization", "in (0, 1)",
               self.vllm_gpu_memory_utilization)


@dataclass
class AlgoConfig:
    """The objective, by registered name (``dgg.algos``); DGG gates whichever is chosen."""

    advantage: str = "grpo"
    """Advantage estimator: grpo (the paper's Eq. 1), drgrpo (mean-centred only), rloo (leave-one-out)."""
    loss: str = "ppo_clip"
    """Policy loss: ppo_clip (Eq. 1; with algo.clip_eps_high it is DAPO's clip-higher), gspo (sequence-level
    ratio), cispo (clipped, stop-gradient importance weight)."""
    clip_eps: float = 0.2
    """ε_c of Eq. 1: the ratio is clipped to [1 − clip_eps, 1 + clip_eps_high]."""
    clip_eps_high: float | None = None
    """Upper clip (DAPO's clip-higher); None uses clip_eps."""
    kl_coef: float = 0.0
    """Weight of the KL to the initial (reference) model; 0 as in the paper's math runs."""
    aggregation: str = "token-mean"
    """token-mean (the paper's 1/T; DAPO), seq-mean-token-mean (original GRPO; GSPO), group-mean-token-mean,
    seq-mean-token-sum-norm (Dr. GRPO: token sums over rollout.max_new_tokens)."""
    kl_estimator: str = "k3"
    """Estimator of KL(π_θ‖π_ref) used when algo.kl_coef > 0: k1, k2 or k3."""
    kl_in: str = "loss"
    """Where the KL to the reference goes: ``loss`` (a penalty term, GRPO) or ``reward`` (subtracted from each
    completion's reward before advantages, PPO-RLHF style; its estimate uses π_old)."""
    token_credit: str = "none"
    """none, stapo (silence rare spurious tokens of positive-advantage completions) or eapo (entropy-aware
    scaling of token advantages); both are approximations of their papers (docs/algorithms.md)."""
    token_mask: str = "none"
    """none, or m2po: M2PO's second-moment mask (as AReaL's actor.m2_threshold), which drops the tokens with the
    largest (log π_θ − log π_old)² from the loss until the mean of the rest is below m2_threshold: a mask, not a
    stop, to compare with reuse.rule=m2."""
    m2_threshold: float = 0.04
    """m2po: the bound on the mean (log r)² of the tokens kept (M2PO's and AReaL's example: 0.04)."""
    seq_clip_eps: float = 3e-4
    """gspo: the sequence ratio is clipped to [1 − seq_clip_eps, 1 + seq_clip_eps_high]."""
    seq_clip_eps_high: float = 4e-4
    """gspo: upper clip of the sequence ratio."""
    stapo_max_prob: float = 0.01
    """stapo: a token is spurious when its probability is below this..."""
    stapo_max_entropy: float = 0.5
    """stapo: ...at a position whose entropy (nats) is below this."""
    eapo_alpha: float = 0.5
    """eapo: strength of the entropy scaling, in [0, 1]."""

    def __post_init__(self):
        from dgg.algos import (
            ADVANTAGES,
            AGGREGATIONS,
            KL_ESTIMATORS,
            KL_PLACES,
            POLICY_LOSSES,
            TOKEN_CREDIT,
            TOKEN_MASKS,
        )

        for registry, name in ((ADVANTAGES, self.advantage), (POLICY_LOSSES, self.loss),
                               (AGGREGATIONS, self.aggregation), (KL_ESTIMATORS, self.kl_estimator),
                               (TOKEN_CREDIT, self.token_credit), (TOKEN_MASKS, self.token_mask)):
            _check(name in registry, registry.field, f"one of {', '.join(registry.names())}", name)
        _check(self.kl_in in KL_PLACES, "algo.kl_in", f"one of {', '.join(KL_PLACES)}", self.kl_in)
        for name in ("seq_clip_eps", "seq_clip_eps_high", "stapo_max_prob", "stapo_max_entropy", "m2_threshold"):
            _check(getattr(self, name) > 0, f"algo.{name}", "> 0", getattr(self, name))
        _check(0 <= self.eapo_alpha <= 1, "algo.eapo_alpha", "in [0, 1]", self.eapo_alpha)
        _check(0 < self.clip_eps < 1, "algo.clip_eps", "in (0, 1)", self.clip_eps)
        _check(self.clip_eps_high is None or self.clip_eps_high > 0, "algo.clip_eps_high", "> 0 or null",
               self.clip_eps_high)
        _check(self.kl_coef >= 0, "algo.kl_coef", ">= 0", self.kl_coef)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """AdamW learning rate (the paper uses 1e-6 on 4B–7B models; tiny models need far more)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (β1, β2)."""
    grad_clip: float | None = 1.0
    """Global gradient-norm clip applied after the probe reads the unclipped energy; null disables."""

    def __post_init__(self):
        self.betas = tuple(self.betas)
        _check(self.lr > 0 and math.isfinite(self.lr), "optim.lr", "a finite number > 0", self.lr)
        _check(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               "two numbers in [0, 1)", self.betas)
        _check(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", "> 0 or null", self.grad_clip)


@dataclass
class ReuseConfig:
    mode: str = "dgg"
    """``single`` (each batch used once), ``fixed`` (always max_reuse updates) or ``dgg`` (up to max_reuse, gated)."""
    max_reuse: int = 4
    """K of Algorithm 1: the most update passes over one rollout batch (single mode forces 1)."""
    tau: float = 0.5
    """τ of Eq. 8: the anomaly threshold on the z-score of Δg (paper: 0.1, 0.5 or 1.0)."""
    window: int = 20
    """W: past accepted increments forming μ and σ (paper: 20)."""
    history: str = "all"
    """Which increments enter the window: ``all`` (paper) or ``reuse`` (only k > 1)."""
    mini_batches: int = 1
    """Optimizer steps per pass over the batch (1 = full-batch update, as in the paper's Algorithm 1)."""
    mini_batch_order: str = "shuffle"
    """With mini_batches > 1: ``shuffle`` (a new random partition of the batch every pass, as verl's shuffle) or
    ``fixed`` (pass 1's partition in every pass, so that pass k's i-th update sees the same samples as pass 1's).
    Each update record logs ``mini_batch`` and ``mini_batch_rows`` either way."""
    tied: str = "output"
    """For tied embeddings, which part of the shared gradient the probe measures: ``output`` or ``total``."""
    rule: str | None = None
    """Which reuse rule decides, per attempt and before the optimizer, to drop the step and end the batch's
    reuse (dgg.reuse_rules): ``dgg`` (the paper's gate), ``kl`` (SB3's target_kl), ``clip``, ``m2``,
    ``nosignal``, ``gradnorm`` (OLMo-core's grad-norm step skip), ``none``, or several joined with ``+``
    (``dgg+nosignal``). null: ``dgg`` in dgg mode,
    ``none`` in single and fixed mode."""
    target_kl: float = 0.02
    """kl rule: stop when the attempt's approximate KL to π_old exceeds 1.5 × target_kl (SB3's semantics)."""
    kl_estimator: str = "k3"
    """kl rule: ``k3`` = mean((r − 1) − log r) (SB3's approx_kl) or ``k1`` = mean(log π_old − log π_θ)
    (Spinning Up's)."""
    target_clip: float = 0.2
    """clip rule: stop when more than this fraction of the attempt's active tokens is clipped."""
    target_m2: float = 0.04
    """m2 rule: stop when mean((log r)²) over the attempt's active tokens exceeds this."""
    signal_floor: float = 1e-3
    """nosignal rule: at k > 1, drop a step whose lm_head energy is below signal_floor × the batch's k = 1
    energy (0 disables that part; a batch with no non-zero advantage is always dropped)."""
    gradnorm_window: int = 128
    """gradnorm rule: how many previous global gradient norms form the mean and standard deviation (OLMo-core's
    rolling_interval_length, default 128); the test starts once max(20, window // 2) norms are in."""
    gradnorm_sigma: float = 6.0
    """gradnorm rule: drop a step whose norm is more than this many standard deviations from the window's mean
    (OLMo-core's sigma_factor, default 6)."""
    fresh_drop: str = "end_batch"
    """What a drop on fresh data (k = 1: any mini-batch of a batch's first pass) does, for the rules that drop
    there (``gradnorm``, ``nosignal``, a non-finite gradient): ``end_batch`` ends the batch, as Algorithm 1
    reads, so its remaining fresh mini-batches go unused; ``skip_step`` drops that step alone and trains on the
    rest, as OLMo-core's step skip does. A drop during reuse (k > 1) always ends the batch."""

    def __post_init__(self):
        _check(self.mode in REUSE_MODES, "reuse.mode", f"one of {REUSE_MODES}", self.mode)
        _check(self.max_reuse >= 1, "reuse.max_reuse", "an integer >= 1", self.max_reuse)
        try:
            check_gate_settings(self.tau, self.window, self.history, prefix="reuse.")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _check(self.mini_batches >= 1, "reuse.mini_batches", "an integer >= 1", self.mini_batches)
        _check(self.mini_batch_order in ("shuffle", "fixed"), "reuse.mini_batch_order", "shuffle or fixed",
               self.mini_batch_order)
        _check(self.tied in ("output", "total"), "reuse.tied", "output or total", self.tied)
        if self.rule is not None:
            try:
                parse_rule_names(self.rule)
            except ValueError as err:
                raise ConfigError(f"reuse.rule: {err}") from None
        _check(self.target_kl > 0, "reuse.target_kl", "> 0", self.target_kl)
        _check(self.kl_estimator in KL_STOP_SIGNALS, "reuse.kl_estimator", f"one of {tuple(KL_STOP_SIGNALS)}",
               self.kl_estimator)
        _check(self.target_clip > 0, "reuse.target_clip", "> 0", self.target_clip)
        _check(self.target_m2 > 0, "reuse.target_m2", "> 0", self.target_m2)
        _check(self.signal_floor >= 0, "reuse.signal_floor", ">= 0", self.signal_floor)
        _check(isinstance(self.gradnorm_window, int) and self.gradnorm_window >= 19, "reuse.gradnorm_window",
               "an integer >= 19 (the test needs 20 norms, the current one included)", self.gradnorm_window)
        _check(self.gradnorm_sigma > 0, "reuse.gradnorm_sigma", "> 0", self.gradnorm_sigma)
        _check(self.fresh_drop in FRESH_DROPS, "reuse.fresh_drop", " or ".join(FRESH_DROPS), self.fresh_drop)

    @property
    def rule_spec(self) -> str:
        """The rule in force: ``rule``, or the mode's own (``dgg`` for dgg mode, ``none`` otherwise)."""
        return self.rule if self.rule is not None else ("dgg" if self.mode == "dgg" else "none")

    def rule_settings(self) -> RuleSettings:
        return RuleSettings(tau=self.tau, window=self.window, history=self.history, target_kl=self.target_kl,
                            kl_estimator=self.kl_estimator, target_clip=self.target_clip,
                            target_m2=self.target_m2, signal_floor=self.signal_floor,
                            gradnorm_window=self.gradnorm_window, gradnorm_sigma=self.gradnorm_sigma,
                            fresh_drop=self.fresh_drop)

    @property
    def passes(self) -> int:
        """Update passes per batch: 1 for single-use, else max_reuse."""
        return 1 if self.mode == "single" else self.max_reuse


@dataclass
class TrainConfig:
    max_batches: int = 100
    """Rollout batches to train on (each costs prompts_per_batch · group_size rollouts)."""
    seed: int = 0
    """Seeds sampling, data order and initialisation of anything random."""
    micro_batch_size: int | None = None
    """Rows per forward/backward (gradient accumulation); null = the whole (mini-)batch at once."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N batches (0: by time only, see checkpoint_minutes)."""
    checkpoint_minutes: float = 10.0
    """Also write one when this many minutes have passed since the last (0: never by time), so that a kill
    costs at most this much work. Checkpointing stays off the training clock."""
    threads: int | None = None
    """torch CPU threads (null: torch's default, capped at the cores this process may run on)."""
    precision: str = "fp32"
    """``fp32``, or ``bf16``: bfloat16 autocast of every forward (sampling, scoring, training, evaluation) over
    float32 master weights; gradients, AdamW's state, the loss reductions and the gate's energy stay float32.
    ``auto``: bf16 where the hardware multiplies it (a GPU with bf16, a CPU with avx512_bf16 or AMX), else fp32
    (an emulated bf16 is slower); the run's config.yaml records what it resolved to."""
    logprob_chunk: int = 0
    """0: the lm_head computes every completion token's logits at once (tokens × vocabulary floats, and as many
    again for their gradient). N > 0: N tokens at a time, forward and backward (dgg.chunked_logprobs), so that
    memory no longer grows with tokens × vocabulary, for one more lm_head matmul per token; for a large
    vocabulary (Gemma-3's 262k rows). Needs profile.theorem2=false; profile.energy_split_every then runs the
    lm_head on the kept tokens once more itself."""
    activation_checkpointing: bool = False
    """Keep only each layer's input in the training forward and recompute the rest in the backward pass (the
    model's own activation checkpointing), for less memory and about one more forward per update. The training
    forward then runs each completion's prompt itself instead of sharing it through a key/value cache."""
    return_freed_memory: bool = False
    """Have glibc give freed blocks back to the operating system at once instead of keeping them for later
    (dgg.host_memory): a SmolLM2 batch's peak resident memory falls by about 0.55 GB, and its wall-clock rises by
    about a quarter (every large block is mapped afresh; BENCHMARKS.md, "Peak memory of a training batch").
    Results are unchanged."""

    def __post_init__(self):
        _check(self.logprob_chunk >= 0, "train.logprob_chunk", "an integer >= 0 (0: off)", self.logprob_chunk)
        _check(self.max_batches >= 1, "train.max_batches", "an integer >= 1", self.max_batches)
        _check(self.micro_batch_size is None or self.micro_batch_size >= 1, "train.micro_batch_size",
               "an integer >= 1 or null", self.micro_batch_size)
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", "an integer >= 0", self.checkpoint_every)
        _check(self.checkpoint_minutes >= 0, "train.checkpoint_minutes", "a number >= 0", self.checkpoint_minutes)
        _check(self.threads is None or self.threads >= 1, "train.threads", "an integer >= 1 or null", self.threads)
        _check(self.precision in PRECISIONS, "train.precision", f"one of {PRECISIONS}", self.precision)


@dataclass
class AgentConfig:
    """Limits of multi-turn episodes, used when ``task.name`` is an environment (``dgg.agents``); each reply is at
    most ``rollout.max_new_tokens``."""

    max_turns: int = 4
    """Policy replies per episode; one still running after the last ends with its reward so far (counted)."""
    max_episode_tokens: int = 256
    """Longest completion region, replies and observations together (the same kind of end)."""
    env_timeout_s: float = 10.0
    """An environment ``reset``/``step`` slower than this ends its episode with reward 0, counted and logged."""

    def __post_init__(self):
        _check(self.max_turns >= 1, "agent.max_turns", "an integer >= 1", self.max_turns)
        _check(self.max_episode_tokens >= 1, "agent.max_episode_tokens", "an integer >= 1", self.max_episode_tokens)
        _check(0 < self.env_timeout_s < math.inf, "agent.env_timeout_s", "a finite number > 0", self.env_timeout_s)


@dataclass
class EvalConfig:
    every: int = 10
    """Evaluate every N batches (and before the first and after the last); 0 disables."""
    problems: int = 64
    """Held-out problems per evaluation."""
    samples: int = 4
    """k of mean@k: completions per problem (the paper reports mean@16)."""
    temperature: float = 1.0
    """Sampling temperature at evaluation."""

    def __post_init__(self):
        _check(self.every >= 0, "eval.every", "an integer >= 0", self.every)
        _check(self.problems >= 1, "eval.problems", "an integer >= 1", self.problems)
        _check(self.samples >= 1, "eval.samples", "an integer >= 1", self.samples)
        _check(self.temperature > 0, "eval.temperature", "> 0", self.temperature)


@dataclass
class ProfileConfig:
    weights_every: int = 10
    """Δ of Fig. 1: log relative weight change per component every N applied updates (0 disables)."""
    snapshot_on_cpu: bool = True
    """Keep the one weight snapshot the profiler needs in CPU memory rather than on the accelerator."""
    theorem2: bool = True
    """Check Theorem 2 live: log theory/c_max, theory/r2_mean, theory/bound_slack per update (costs a softmax
    over the training forward's logits). Skipped when algo.kl_coef > 0 or the probe reads a tied total."""
    energy_split_every: int = 0
    """Every N update attempts, log the lm_head energy of the negative- and positive-advantage tokens'
    gradient apart (energy/neg, energy/pos, energy/neg_share; dgg.energy_split): the paper's mechanism, measured
    directly. Costs about two lm_head matmuls per micro-batch (0 disables)."""
    c_struct_every: int = 0
    """Log theory/c_struct_p95 (Fig. 6) every N batches on a fixed probe set of held-out prompts (0 disables)."""
    c_struct_tokens: int = 8
    """Token positions sampled for each C_struct measurement."""

    def __post_init__(self):
        _check(self.weights_every >= 0, "profile.weights_every", "an integer >= 0", self.weights_every)
        _check(self.c_struct_every >= 0, "profile.c_struct_every", "an integer >= 0", self.c_struct_every)
        _check(self.energy_split_every >= 0, "profile.energy_split_every", "an integer >= 0",
               self.energy_split_every)
        _check(self.c_struct_tokens >= 1, "profile.c_struct_tokens", "an integer >= 1", self.c_struct_tokens)


@dataclass
class OutputConfig:
    dir: str = "runs/train"
    """Run directory: config.yaml, metrics.jsonl, checkpoint/."""
    tensorboard: bool = False
    """Also write TensorBoard scalars (needs ``pip install dgg[tensorboard]``)."""
    progress: bool = True
    """Show a progress bar."""
    overwrite: bool = False
    """Replace a run already in ``dir`` (its metrics, config, checkpoints and reward log). Without it a fresh
    run refuses a directory that holds one; ``--resume DIR`` continues it instead."""

    def __post_init__(self):
        _check(isinstance(self.dir, str) and self.dir.strip() != "", "output.dir", "a non-empty path", self.dir)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reuse: ReuseConfig = field(default_factory=ReuseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:  # checks that span two sections
        if self.algo.aggregation == "group-mean-token-mean" and self.reuse.mini_batches > 1:
            raise ConfigError("algo.aggregation=group-mean-token-mean needs whole groups in each update, so "
                              "reuse.mini_batches must be 1")
