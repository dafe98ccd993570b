"""Sampling rollout batches with the KV cache, and per-token log-probs (Algorithm 1, line 2).

Layout of a batch of N = P·G completions: ``input_ids`` is the left-padded prompt (``prompt_length``
columns) followed by the completion (R columns, padded after EOS); the G completions of a prompt are adjacent.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import time
from dataclasses import dataclass, field

import torch

from dgg.chunked_logprobs import chunked_token_logprobs, lm_head_bypassed
from dgg.precision import autocast
from dgg.tasks import Problem


@dataclass
class RolloutBatch:
    """One rollout batch, carried from sampling through the reuse loop."""

    problems: list[Problem]  # one per completion, N
    completions: list[str]  # decoded completion text, N
    input_ids: torch.Tensor  # (N, prompt_length + R)
    attention_mask: torch.Tensor  # (N, prompt_length + R)
    completion_mask: torch.Tensor  # (N, R) 1.0 on sampled tokens up to and including EOS
    prompt_length: int
    old_logprobs: torch.Tensor | None = None  # (N, R) log π_old of the sampled tokens
    rewards: torch.Tensor | None = None  # (N,)
    advantages: torch.Tensor | None = None  # (N,)
    reward_infos: list[dict] = field(default_factory=list)
    reference_logprobs: torch.Tensor | None = None  # (N, R) log π_ref, only when a KL term is used
    generation_seconds: float = 0.0
    scoring_seconds: float = 0.0

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor | slice) -> RolloutBatch:
        """A mini-batch view (rows ``index``) for mini-batched or micro-batched updates."""
        rows = range(self.size)[index] if isinstance(index, slice) else index.tolist()

        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[index]

        return RolloutBatch(
            problems=[self.problems[i] for i in rows], completions=[self.completions[i] for i in rows],
            input_ids=self.input_ids[index], attention_mask=self.attention_mask[index],
            completion_mask=self.completion_mask[index], prompt_length=self.prompt_length,
            old_logprobs=pick(self.old_logprobs), rewards=pick(self.rewards), advantages=pick(self.advantages),
            reference_logprobs=pick(self.reference_logprobs),
            reward_infos=[self.reward_infos[i] for i in rows] if self.reward_infos else [],
        )

    TENSORS = ("input_ids", "attention_mask", "completion_mask", "old_logprobs", "rewards", "advantages",
               "reference_logprobs")

    def to_state(self) -> dict | None:
        """The batch as tensors plus one JSON string, so that a checkpoint holding it loads with
        ``weights_only``; None when a problem's meta or a reward's info is not JSON (it cannot be saved)."""
        try:
            text = json.dumps({"problems": [[p.prompt, p.answer, p.meta] for p in self.problems],
                               "completions": self.completions, "prompt_length": self.prompt_length,
                               "reward_infos": self.reward_infos, "generation_seconds": self.generation_seconds,
                               "scoring_seconds": self.scoring_seconds})
        except (TypeError, ValueError):
            return None
        return {"json": text, **{name: getattr(self, name) for name in self.TENSORS}}

    @classmethod
    def from_state(cls, state: dict) -> RolloutBatch:
        rest = json.loads(state["json"])
        rest["problems"] = [Problem(prompt, answer, meta) for prompt, answer, meta in rest["problems"]]
        return cls(**rest, **{name: state[name] for name in cls.TENSORS})


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` uses them, so log-probs match sampling."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                      *, return_hidden: bool = False):
    """(N, R, V) raw logits at the positions that predict the R completion tokens (position t predicts t+1);
    with ``return_hidden`` also the detached lm_head input ``h_L`` (N, R, d) at the same positions.

    Two savings, both exact (the same numbers up to float rounding, gradients included):

    - Only those R positions go through the lm_head (``logits_to_keep``), not the prompt's: with a 49k
      vocabulary the prompt's logits would cost more memory and time than the rest of the forward.
    - The G completions of a prompt share it: adjacent rows with the same prompt run the prompt once, and
      its key/value cache is repeated for each completion (gradients from every completion flow back into
      the one prompt pass). With 8 completions of ≤ 16 tokens after a 56-token chat prompt this cuts the
      tokens through the network by 3×.

    Models whose forward takes neither ``logits_to_keep`` nor a cache compute every position and are sliced.
    """
    positions = position_ids_for(attention_mask)
    completion_length = input_ids.shape[1] - prompt_length
    groups = None
    with _record_lm_head_inputs(model, return_hidden) as seen:
        if not _accepts_logits_to_keep(model):
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                           use_cache=False).logits[:, prompt_length - 1:-1]
        elif _recomputes_activations(model) or (groups := prompt_groups(input_ids[:, :prompt_length],
                                                                         attention_mask[:, :prompt_length])) is None:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                           use_cache=False, logits_to_keep=completion_length + 1).logits[:, :-1]
        else:
            logits = _logits_with_shared_prompts(model, input_ids, attention_mask, positions, prompt_length, *groups)
    if not return_hidden:
        return logits
    if groups is not None:  # the prompt pass's last position, per completion, then the completion pass
        return logits, torch.cat([seen[0][groups[1]], *seen[1:]], dim=1)
    return logits, seen[0][:, -(completion_length + 1):-1]


@contextlib.contextmanager
def _record_lm_head_inputs(model, enabled: bool):
    """The detached inputs of every lm_head call inside the block (nothing is hooked when not enabled)."""
    seen: list[torch.Tensor] = []
    handle = None
    if enabled:
        handle = model.get_output_embeddings().register_forward_pre_hook(
            lambda module, inputs: seen.append(inputs[0].detach()))
    try:
        yield seen
    finally:
        if handle is not None:
            handle.remove()


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first row of each run of identical adjacent prompts, the run each row belongs to), or None when no two
    adjacent rows share a prompt."""
    same = (prompt_ids[1:] == prompt_ids[:-1]).all(dim=1) & (prompt_mask[1:] == prompt_mask[:-1]).all(dim=1)
    if not bool(same.any()):
        return None
    starts = torch.cat([same.new_ones(1), ~same])  # (N,) True where a new prompt begins
    return starts.nonzero().squeeze(1), starts.long().cumsum(0) - 1


def _logits_with_shared_prompts(model, input_ids, attention_mask, positions, prompt_length, first_rows, owner):
    prompt = model(input_ids=input_ids[first_rows, :prompt_length],
                   attention_mask=attention_mask[first_rows, :prompt_length],
                   position_ids=positions[first_rows, :prompt_length], use_cache=True, logits_to_keep=1)
    first_logits = prompt.logits[owner]  # (N, 1, V): the last prompt position predicts the first token
    if input_ids.shape[1] - prompt_length == 1:
        return first_logits
    cache_name = _cache_argument(model)  # transformers 5 calls it ``cache``, 4.x ``past_key_values``
    cache = prompt[cache_name]
    cache.batch_select_indices(owner)  # one copy of the prompt's keys/values per completion (differentiable)
    rest = model(input_ids=input_ids[:, prompt_length:-1], attention_mask=attention_mask[:, :-1],
                 position_ids=positions[:, prompt_length:-1], use_cache=True, **{cache_name: cache}).logits
    return torch.cat([first_logits, rest], dim=1)


def _recomputes_activations(model) -> bool:
    """Activation checkpointing is on for this (training) forward: it runs without a key/value cache, so the
    prompt cannot be shared through one."""
    flag = getattr(model, "is_activation_checkpointing", None)
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag) and model.training


def _forward_parameters(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (AttributeError, TypeError, ValueError):
        return set()


def _accepts_logits_to_keep(model) -> bool:
    parameters = _forward_parameters(model)
    return "logits_to_keep" in parameters and bool({"cache", "past_key_values"} & parameters)


def _cache_argument(model) -> str:
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                        temperature: float = 1.0, *, return_logits: bool = False, chunk: int = 0):
    """(N, R) log π(a_t | prefix) of the completion tokens, under logits / temperature, in float32.

    The temperature matches the sampling distribution, so r_i = π_θ/π_old compares like with like.
    (top-p truncation at sampling time is not modelled, as in TRL and verl.) With ``return_logits`` returns
    ``(logprobs, logits, hidden)``: also the detached float32 raw logits (N, R, V) and the lm_head input
    (N, R, d) at those positions, e.g. for Theorem 2's bound, so that nobody runs the lm_head a second time.
    ``chunk`` > 0 never holds the full logits: the lm_head runs ``chunk`` tokens at a time
    (:mod:`dgg.chunked_logprobs`); with ``return_logits`` it returns ``(logprobs, None, hidden)``.
    """
    if chunk:
        with lm_head_bypassed(model) as head:
            hidden = completion_logits(model, input_ids, attention_mask, prompt_length)
        logprobs = chunked_token_logprobs(hidden, head, input_ids[:, prompt_length:], temperature, chunk)
        return (logprobs, None, hidden.detach()) if return_logits else logprobs
    raw, hidden = completion_logits(model, input_ids, attention_mask, prompt_length, return_hidden=True) \
        if return_logits else (completion_logits(model, input_ids, attention_mask, prompt_length), None)
    raw = raw.float()
    logits = raw / temperature
    targets = input_ids[:, prompt_length:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logprobs = picked - torch.logsumexp(logits, dim=-1)
    return (logprobs, raw.detach(), hidden) if return_logits else logprobs


def mask_after_eos(completion_ids: torch.Tensor, eos_token_id: int | list[int] | None) -> torch.Tensor:
    """1.0 on tokens up to and including the first EOS, 0.0 after it (and on everything if none)."""
    if eos_token_id is None:
        return torch.ones_like(completion_ids, dtype=torch.float32)
    eos_ids = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id],
                           device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos_ids).long()
    eos_seen_before = is_eos.cumsum(-1) - is_eos  # number of EOS strictly before each position
    return (eos_seen_before == 0).float()


def shared_prompt_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """``generate`` keyword arguments that start it from a cache of all but the last prompt token, computed
    once per distinct prompt and repeated for its G completions (the group shares the prefill); {} when no
    two adjacent rows share a prompt or the model takes no cache."""
    groups = prompt_groups(input_ids, attention_mask)
    if groups is None or input_ids.shape[1] < 2 or not _accepts_logits_to_keep(model):
        return {}
    first, owner = groups
    mask = attention_mask[first, :-1]
    prefill = model(input_ids=input_ids[first, :-1], attention_mask=mask, position_ids=position_ids_for(mask),
                    use_cache=True, logits_to_keep=1)
    name = _cache_argument(model)
    cache = prefill[name]
    cache.batch_select_indices(owner)
    return {name: cache}


@torch.no_grad()
def sample_rollouts(model, tokenizer, problems: list[Problem], group_size: int, max_new_tokens: int,
                    temperature: float = 1.0, top_p: float = 1.0, precision: str = "fp32") -> RolloutBatch:
    """Sample ``group_size`` completions per problem with the KV cache (``model.generate``) from the full
    tempered softmax (no top-k); ``temperature=0`` decodes greedily.

    Returns a batch with π_old log-probs left empty; see :func:`score_old_policy`.
    """
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    repeated = [p for p in problems for _ in range(group_size)]
    prompts = [p.prompt for p in repeated]
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    input_ids, attention_mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    prompt_length = input_ids.shape[1]
    with autocast(device, precision):
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            **(dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0
               else dict(do_sample=False, temperature=None, top_p=None, top_k=None)),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, **shared_prompt_cache(model, input_ids, attention_mask),
        )
    completion_ids = output[:, prompt_length:]
    completion_mask = mask_after_eos(completion_ids, tokenizer.eos_token_id)
    # Positions after EOS hold padding: mask them out of attention as well.
    full_mask = torch.cat([attention_mask, completion_mask.to(attention_mask.dtype)], dim=1)
    texts = tokenizer.batch_decode(completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    model.train(was_training)
    return RolloutBatch(problems=repeated, completions=texts, input_ids=output, attention_mask=full_mask,
                        completion_mask=completion_mask, prompt_length=prompt_length,
                        generation_seconds=time.perf_counter() - started)


@torch.no_grad()
def score_old_policy(model, batch: RolloutBatch, temperature: float, micro_batch_size: int | None = None,
                     precision: str = "fp32", chunk: int = 0) -> None:
    """Fill ``batch.old_logprobs`` with log π_old, once per batch, before any update on it."""
    was_training = model.training
    model.eval()
    size = micro_batch_size or batch.size
    device = next(model.parameters()).device
    with autocast(device, precision):
        chunks = [completion_logprobs(model, batch.input_ids[i:i + size], batch.attention_mask[i:i + size],
                                      batch.prompt_length, temperature, chunk=chunk)
                  for i in range(0, batch.size, size)]
    batch.old_logprobs = torch.cat(chunks).detach()
    model.train(was_training)


def score_before_updates(batch: RolloutBatch, policy, reference, score_policy: bool, temperature: float,
                         micro_batch_size: int | None, precision: str, chunk: int = 0) -> None:
    """Score what must be scored before the batch's first update: the reference policy (for a KL term), and
    π_old when ``score_policy`` (otherwise the first update's own forward yields it for free)."""
    started = time.perf_counter()
    if reference is not None:
        score_old_policy(reference, batch, temperature, micro_batch_size, precision, chunk)
        batch.reference_logprobs, batch.old_logprobs = batch.old_logprobs, None  # same scorer, other model
    if score_policy:
        score_old_policy(policy, batch, temperature, micro_batch_size, precision, chunk)
    batch.scoring_seconds = time.perf_counter() - started


def render_prompt(tokenizer, problem: Problem, chat: bool) -> Problem:
    """The prompt's text as the model must see it: through the tokenizer's chat template when the task asks
    for it; otherwise after the BOS token when the tokenizer itself starts every text with one (Gemma: without
    it the model writes nonsense), since prompts are tokenized without special tokens."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": problem.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    elif (bos := leading_bos(tokenizer)) and not problem.prompt.startswith(bos):
        text = bos + problem.prompt
    else:
        return problem
    return Problem(prompt=text, answer=problem.answer, meta=problem.meta)


@functools.lru_cache(maxsize=8)
def leading_bos(tokenizer) -> str | None:
    """The BOS token's text if the tokenizer puts it before every text it encodes, else None (asked once per
    tokenizer: render_prompt runs for every prompt of every batch)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return None
    ids = tokenizer("1").input_ids
    return tokenizer.bos_token if ids and ids[0] == bos_id else None


@torch.no_grad()
def token_entropy(raw_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, R) entropy in nats of the sampling distribution (logits / temperature) at each completion position."""
    logp = torch.log_softmax(raw_logits / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def mini_batches(batch: RolloutBatch, count: int, seed: tuple) -> list[tuple[list[int] | None, RolloutBatch]]:
    """(sorted row indices, mini-batch) for each of ``count`` optimizer steps over ``batch``, a random partition
    drawn from ``seed``; one step is the whole batch (rows None)."""
    if count == 1:
        return [(None, batch)]
    generator = torch.Generator().manual_seed(hash(seed) % (2**63))
    order = torch.randperm(batch.size, generator=generator)
    return [(sorted(rows.tolist()), batch.select(rows)) for rows in order.chunk(count)]


def batch_metrics(batch: RolloutBatch, group_size: int, reward_errors: int) -> dict[str, float]:
    """The rollout record's rewards and lengths (docs/metrics.md, "rollout")."""
    lengths = batch.completion_mask.sum(dim=1)
    grouped = batch.rewards.view(-1, group_size)
    return {
        "reward/mean": float(batch.rewards.mean()),
        "reward/std": float(batch.rewards.std()) if batch.size > 1 else 0.0,
        "reward/errors": reward_errors,
        "reward/zero_std_groups": float((grouped.std(dim=1) == 0).float().mean()),
        "rollout/length_mean": float(lengths.float().mean()),
        "rollout/length_max": int(lengths.max()),
        "rollout/seconds": batch.generation_seconds,
        "rollout/scoring_seconds": batch.scoring_seconds,
    }
