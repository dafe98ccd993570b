"""Sampling rollout batches with the KV cache, and per-token log-probs (Algorithm 1, line 2).

Layout of a batch of N = P·G completions: ``input_ids`` is the left-padded prompt (``prompt_length``
columns) followed by the completion (R columns, padded after EOS); the G completions of a prompt are adjacent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

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


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` uses them, so log-probs match sampling."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                        temperature: float = 1.0) -> torch.Tensor:
    """(N, R) log π(a_t | prefix) of the completion tokens, under logits / temperature.

    The temperature matches the sampling distribution, so r_i = π_θ/π_old compares like with like.
    (top-p truncation at sampling time is not modelled, as in TRL and verl.)
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_for(attention_mask), use_cache=False).logits
    logits = logits[:, prompt_length - 1:-1].float() / temperature  # (N, R, V): position t predicts t+1
    targets = input_ids[:, prompt_length:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def mask_after_eos(completion_ids: torch.Tensor, eos_token_id: int | list[int] | None) -> torch.Tensor:
    """1.0 on tokens up to and including the first EOS, 0.0 after it (and on everything if none)."""
    if eos_token_id is None:
        return torch.ones_like(completion_ids, dtype=torch.float32)
    eos_ids = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id],
                           device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos_ids).long()
    eos_seen_before = is_eos.cumsum(-1) - is_eos  # number of EOS strictly before each position
    return (eos_seen_before == 0).float()


@torch.no_grad()
def sample_rollouts(model, tokenizer, problems: list[Problem], group_size: int, max_new_tokens: int,
                    temperature: float = 1.0, top_p: float = 1.0) -> RolloutBatch:
    """Sample ``group_size`` completions per problem with the KV cache (``model.generate``).

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
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=temperature,
        top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
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
def score_old_policy(model, batch: RolloutBatch, temperature: float, micro_batch_size: int | None = None) -> None:
    """Fill ``batch.old_logprobs`` with log π_old, once per batch, before any update on it."""
    was_training = model.training
    model.eval()
    size = micro_batch_size or batch.size
    chunks = [completion_logprobs(model, batch.input_ids[i:i + size], batch.attention_mask[i:i + size],
                                  batch.prompt_length, temperature) for i in range(0, batch.size, size)]
    batch.old_logprobs = torch.cat(chunks).detach()
    model.train(was_training)
