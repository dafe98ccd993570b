"""Who generates the rollouts: a sampler behind Algorithm 1's line 2, so the trainer does not care.

``HFSampler`` runs ``model.generate`` on the training model itself (KV cache, a group's prompt prefilled once).
``VLLMSampler`` runs a colocated vLLM engine and pushes the trainer's weights into it whenever the policy has
changed since its last sync. Either way π_old is scored by the trainer's own model (the first update's forward,
or ``score_old_policy``), so importance ratios compare like with like even where vLLM's kernels differ.

Every sampler returns the same ``RolloutBatch`` layout: left-padded prompts, then completions padded after EOS.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from dgg.config import ConfigError
from dgg.errors import UserError
from dgg.rollout import RolloutBatch, mask_after_eos, sample_rollouts
from dgg.tasks import Problem

SAMPLERS = ("hf", "vllm")


class Sampler(Protocol):
    def sample(self, problems: list[Problem], group_size: int, max_new_tokens: int, temperature: float,
               top_p: float) -> RolloutBatch: ...

    def policy_changed(self) -> None:
        """The trainer applied an optimizer step: the next ``sample`` must use the new weights."""


class HFSampler:
    """``model.generate`` on the training model: always current, nothing to sync."""

    def __init__(self, model, tokenizer, precision: str = "fp32"):
        self.model, self.tokenizer, self.precision = model, tokenizer, precision

    def sample(self, problems, group_size, max_new_tokens, temperature, top_p) -> RolloutBatch:
        return sample_rollouts(self.model, self.tokenizer, problems, group_size, max_new_tokens, temperature, top_p,
                               self.precision)

    def policy_changed(self) -> None:
        pass


def batch_from_token_ids(problems: list[Problem], prompt_ids: list[list[int]], completion_ids: list[list[int]],
                         pad_token_id: int, eos_token_id: int | list[int] | None, device=None) -> RolloutBatch:
    """The trainer's batch layout from ragged token lists (one prompt and one completion per row): prompts
    left-padded to the longest, completions right-padded, masks for attention and for sampled tokens."""
    prompt_length = max(len(p) for p in prompt_ids)
    width = max(1, max(len(c) for c in completion_ids))
    rows = len(prompt_ids)
    prompts = torch.full((rows, prompt_length), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((rows, prompt_length), dtype=torch.long)
    completions = torch.full((rows, width), pad_token_id, dtype=torch.long)
    lengths = torch.zeros(rows, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        if prompt:
            prompts[row, prompt_length - len(prompt):] = torch.tensor(prompt)
            prompt_mask[row, prompt_length - len(prompt):] = 1
        if completion:
            completions[row, :len(completion)] = torch.tensor(completion)
        lengths[row] = len(completion)
    sampled = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).float()
    completion_mask = mask_after_eos(completions, eos_token_id) * sampled  # up to and including EOS
    attention = torch.cat([prompt_mask, completion_mask.long()], dim=1)
    batch = RolloutBatch(problems=problems, completions=[], input_ids=torch.cat([prompts, completions], dim=1),
                         attention_mask=attention, completion_mask=completion_mask, prompt_length=prompt_length)
    if device is not None:
        batch.input_ids, batch.attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        batch.completion_mask = batch.completion_mask.to(device)
    return batch


class VLLMSampler:
    """A colocated vLLM engine on the training model's weights (``pip install dgg[vllm]``; needs a GPU).

    The engine is built from ``model_path`` once; before each ``sample`` after an applied optimizer step, every
    parameter of the training model is pushed with the engine's ``load_weights`` and its prefix cache reset.
    Untested on this project's CPU machine: tests/test_samplers.py runs it only where CUDA and vLLM exist."""

    def __init__(self, model, tokenizer, model_path: str, gpu_memory_utilization: float = 0.3, seed: int = 0,
                 dtype: str = "bfloat16"):
        try:
            from vllm import LLM
        except ImportError as err:
            raise UserError("rollout.sampler=vllm needs vLLM (a GPU machine): pip install 'dgg[vllm]'") from err
        if not torch.cuda.is_available():
            raise UserError("rollout.sampler=vllm needs a CUDA device; use rollout.sampler=hf on this machine")
        self.model, self.tokenizer = model, tokenizer
        self.llm = LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization, seed=seed, dtype=dtype,
                       enable_prefix_caching=True)
        self._stale = False  # the engine starts from the same checkpoint as the trainer
        self._seed = seed
        self.syncs = 0

    def policy_changed(self) -> None:
        self._stale = True

    def _sync(self) -> None:
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        with torch.no_grad():
            engine_model.load_weights((name, param.data) for name, param in self.model.named_parameters())
        self.llm.reset_prefix_cache()
        self._stale, self.syncs = False, self.syncs + 1

    def sample(self, problems, group_size, max_new_tokens, temperature, top_p) -> RolloutBatch:
        from vllm import SamplingParams

        started = time.perf_counter()
        if self._stale:
            self._sync()
        repeated = [p for p in problems for _ in range(group_size)]
        prompt_ids = [self.tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
        self._seed += 1
        params = SamplingParams(n=group_size, temperature=temperature, top_p=top_p, top_k=-1,
                                max_tokens=max_new_tokens, seed=self._seed)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        completion_ids = [list(choice.token_ids) for output in outputs for choice in output.outputs]
        device = next(self.model.parameters()).device
        batch = batch_from_token_ids(repeated, [ids for ids in prompt_ids for _ in range(group_size)], completion_ids,
                                     self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, device)
        ids = batch.input_ids[:, batch.prompt_length:].masked_fill(batch.completion_mask == 0,
                                                                   self.tokenizer.pad_token_id)
        batch.completions = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        batch.generation_seconds = time.perf_counter() - started
        return batch


def make_sampler(name: str, model, tokenizer, precision: str, model_path: str | None = None, seed: int = 0,
                 gpu_memory_utilization: float = 0.3):
    if name == "hf":
        return HFSampler(model, tokenizer, precision)
    if name == "vllm":
        return VLLMSampler(model, tokenizer, model_path, gpu_memory_utilization, seed,
                           "bfloat16" if precision == "bf16" else "float32")
    raise UserError(f"rollout.sampler must be one of {', '.join(SAMPLERS)} (got {name!r})")


def episode_sampler(config, model, tokenizer, task, chat: bool):
    """The multi-turn sampler of an environment task (agents/), after checking the run's settings allow it."""
    from dgg.agents import EpisodeLimits, EpisodeSampler

    if config.rollout.sampler != "hf":
        raise ConfigError(f"task {task.name} is an environment: its multi-turn episodes need rollout.sampler=hf "
                          f"(got {config.rollout.sampler!r})")
    if config.task.reward:
        raise ConfigError(f"task {task.name} is an environment, which scores its own episodes: task.reward must "
                          "be null")
    limits = EpisodeLimits(config.agent.max_turns, config.agent.max_episode_tokens, config.agent.env_timeout_s)
    return EpisodeSampler(model, tokenizer, task, limits, config.train.precision, chat)


def sampler_for_run(config, model, tokenizer, task, chat: bool):
    """The sampler a run draws its rollouts with: multi-turn episodes for an environment task, else
    ``rollout.sampler`` (``hf`` or ``vllm``)."""
    if getattr(task, "is_environment", False):
        return episode_sampler(config, model, tokenizer, task, chat)
    from dgg.loading import resolve_model_path

    return make_sampler(config.rollout.sampler, model, tokenizer, config.train.precision,
                        resolve_model_path(config.model.path) if config.rollout.sampler == "vllm" else None,
                        config.train.seed, config.rollout.vllm_gpu_memory_utilization)
