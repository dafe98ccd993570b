"""Playing episodes in batches, and laying them out as the trainer's ``RolloutBatch``.

An episode is one token sequence: the first observation (the prompt, left-padded), then the policy's replies
and the environment's observations in turn (the completion region, right-padded). ``completion_mask`` is 1
only on tokens the policy sampled, so the loss, the importance ratios and the gate's lm_head probe see the
policy's tokens and nothing else, while every later reply still attends to the observations before it. Token
ids are the truth: replies are kept exactly as sampled and never re-tokenized from text.

Each turn generates for all live episodes of the batch at once. An episode ends when the environment says so,
or at a limit (turns, tokens), keeping its reward so far; an environment that raises or hangs ends its episode
with reward 0, and the failure is counted in the episode's info.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from dgg.agents.env import Environment, EnvironmentTask, StepResult
from dgg.precision import autocast
from dgg.rollout import RolloutBatch, shared_prompt_cache
from dgg.tasks import Problem


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 4
    """Policy replies per episode; an episode still running after the last one ends with its reward so far."""
    max_episode_tokens: int = 256
    """Longest completion region (replies and observations together)."""
    env_timeout_s: float = 10.0
    """A ``reset`` or ``step`` that takes longer ends its episode with reward 0 (``info["env_error"]``)."""


class TurnFormat:
    """The tokens that close a reply and open the next turn around an observation, from the chat template
    (or a bare newline for a model without one), so every turn looks as the model saw it in instruction tuning."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.eos_text = tokenizer.eos_token or ""
        self.before, self.after = "\n", "\n"
        if chat and getattr(tokenizer, "chat_template", None):
            user, reply, observation = "\x01U\x01", "\x01R\x01", "\x01O\x01"
            turns = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            rendered = tokenizer.apply_chat_template([*turns, {"role": "user", "content": observation}],
                                                     tokenize=False, add_generation_prompt=True)
            between = rendered[rendered.index(reply) + len(reply):]
            self.before, self.after = between.split(observation)

    def observation_ids(self, observation: str, reply_ended: bool) -> list[int]:
        """The observation's turn as tokens; the reply's own end-of-turn token is not repeated when it was sampled."""
        text = self.before + observation + self.after
        if reply_ended and self.eos_text and text.startswith(self.eos_text):
            text = text[len(self.eos_text):]
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class Episode:
    problem: Problem
    env: Environment | None
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)  # the completion region: replies and observations
    policy: list[float] = field(default_factory=list)  # 1.0 where the policy sampled the token
    reward: float = 0.0
    turns: int = 0
    done: bool = False
    info: dict = field(default_factory=dict)

    def finish(self, **info) -> None:
        self.done = True
        self.info.update(info)


def run_with_timeout(call, timeout_s: float):
    """``(result, None)`` or ``(None, error)``: an exception or a call still running after ``timeout_s`` (it is
    left to finish on a daemon thread, since Python cannot stop a thread)."""
    box: dict = {}

    def target():
        try:
            box["result"] = call()
        except Exception as err:  # noqa: BLE001  (an environment's failure ends its episode, never the run)
            box["error"] = f"{type(err).__name__}: {err}"

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return None, f"timeout after {timeout_s:g} s"
    return box.get("result"), box.get("error")


@torch.no_grad()
def _generate(model, tokenizer, contexts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
              precision: str, eos_ids: set[int]) -> list[list[int]]:
    """One reply per context, each cut after its first end-of-turn token."""
    device = next(model.parameters()).device
    width = max(len(c) for c in contexts)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(contexts), width), dtype=torch.long)
    for row, context in enumerate(contexts):
        input_ids[row, width - len(context):] = torch.tensor(context)
        attention[row, width - len(context):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    with autocast(device, precision):
        output = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True,
                                temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                **shared_prompt_cache(model, input_ids, attention))
    replies = []
    for row in output[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
        replies.append(row[:end])
    return replies


def _step(episode: Episode, action: str, timeout_s: float) -> StepResult | None:
    result, error = run_with_timeout(lambda: episode.env.step(action), timeout_s)
    if error is None and not isinstance(result, StepResult):
        error = f"step returned {type(result).__name__}, not a StepResult"
    if error is not None:
        episode.reward = 0.0
        episode.finish(env_error=error)
        return None
    return result


def run_episodes(model, tokenizer, task: EnvironmentTask, problems: list[Problem], group_size: int,
                 max_new_tokens: int, limits: EpisodeLimits, temperature: float = 1.0, top_p: float = 1.0,
                 precision: str = "fp32", chat: bool = True) -> RolloutBatch:
    """``group_size`` episodes per problem (its ``meta["env_seed"]``), played turn by turn in one batch, each
    reply at most ``max_new_tokens``; returns the batch with ``rewards`` set (the episode's summed step rewards)
    and one info dict per episode."""
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    turn_format = TurnFormat(tokenizer, chat)
    episodes = []
    for problem in (p for p in problems for _ in range(group_size)):
        env = task.new_environment()
        episode = Episode(problem, env, tokenizer(problem.prompt, add_special_tokens=False)["input_ids"])
        _, error = run_with_timeout(lambda env=env, seed=problem.meta["env_seed"]: env.reset(seed),
                                    limits.env_timeout_s)
        if error is not None:
            episode.finish(env_error=error)
        episodes.append(episode)
    for turn in range(limits.max_turns):
        live = [e for e in episodes if not e.done]
        if not live:
            break
        replies = _generate(model, tokenizer, [e.prompt_ids + e.tokens for e in live], max_new_tokens,
                            temperature, top_p, precision, turn_format.eos_ids)
        for episode, reply in zip(live, replies):
            reply = reply[:limits.max_episode_tokens - len(episode.tokens)]
            episode.tokens += reply
            episode.policy += [1.0] * len(reply)
            episode.turns += 1
            result = _step(episode, tokenizer.decode(reply, skip_special_tokens=True), limits.env_timeout_s)
            if result is None:
                continue
            episode.reward += float(result.reward)
            malformed = bool(result.info.get("invalid"))
            episode.info.update(result.info, invalid=episode.info.get("invalid", False) or malformed,
                                invalid_replies=episode.info.get("invalid_replies", 0) + malformed)
            if result.done:
                episode.finish(truncated=None)
                continue
            observation = turn_format.observation_ids(result.observation, bool(reply) and reply[-1] in turn_format.eos_ids)
            room = limits.max_episode_tokens - len(episode.tokens)
            if turn == limits.max_turns - 1 or room < len(observation) + 1:
                episode.finish(truncated="turns" if turn == limits.max_turns - 1 else "tokens")
                continue
            episode.tokens += observation
            episode.policy += [0.0] * len(observation)
    model.train(was_training)
    batch = episode_batch(episodes, tokenizer.pad_token_id, next(model.parameters()).device)
    batch.completions = [tokenizer.decode(e.tokens, skip_special_tokens=True) for e in episodes]
    batch.generation_seconds = time.perf_counter() - started
    return batch


def episode_batch(episodes: list[Episode], pad_token_id: int, device=None) -> RolloutBatch:
    """The trainer's layout: prompts left-padded, completion regions right-padded; ``attention_mask`` covers
    every real token, ``completion_mask`` only the policy's."""
    prompt_length = max(len(e.prompt_ids) for e in episodes)
    width = max(1, max(len(e.tokens) for e in episodes))
    rows = len(episodes)
    input_ids = torch.full((rows, prompt_length + width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((rows, prompt_length + width), dtype=torch.long)
    policy = torch.zeros((rows, width), dtype=torch.float32)
    for row, e in enumerate(episodes):
        input_ids[row, prompt_length - len(e.prompt_ids):prompt_length] = torch.tensor(e.prompt_ids)
        attention[row, prompt_length - len(e.prompt_ids):prompt_length + len(e.tokens)] = 1
        if e.tokens:
            input_ids[row, prompt_length:prompt_length + len(e.tokens)] = torch.tensor(e.tokens)
            policy[row, :len(e.tokens)] = torch.tensor(e.policy)
    infos = [{**e.info, "turns": e.turns, "policy_tokens": int(sum(e.policy)),
              "observation_tokens": len(e.tokens) - int(sum(e.policy))} for e in episodes]
    batch = RolloutBatch(problems=[e.problem for e in episodes], completions=[], input_ids=input_ids.to(device),
                         attention_mask=attention.to(device), completion_mask=policy.to(device),
                         prompt_length=prompt_length, reward_infos=infos)
    batch.rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float32, device=device)
    return batch


class EpisodeSampler:
    """The trainer's sampler for an environment task: each rollout is a whole episode."""

    def __init__(self, model, tokenizer, task: EnvironmentTask, limits: EpisodeLimits, precision: str = "fp32",
                 chat: bool = True):
        self.model, self.tokenizer, self.task, self.limits = model, tokenizer, task, limits
        self.precision, self.chat = precision, chat

    def sample(self, problems, group_size, max_new_tokens, temperature, top_p) -> RolloutBatch:
        return run_episodes(self.model, self.tokenizer, self.task, problems, group_size, max_new_tokens, self.limits,
                            temperature, top_p, self.precision, self.chat)

    def policy_changed(self) -> None:
        pass


def episode_statistics(batch: RolloutBatch) -> dict[str, float]:
    """The `agent/*` metrics of a batch of episodes (docs/metrics.md)."""
    infos = batch.reward_infos
    policy = sum(i["policy_tokens"] for i in infos)
    observed = sum(i["observation_tokens"] for i in infos)
    return {"agent/turns_mean": sum(i["turns"] for i in infos) / len(infos),
            "agent/truncated": sum(bool(i.get("truncated")) for i in infos),
            "agent/env_errors": sum(bool(i.get("env_error")) for i in infos),
            "agent/invalid_episodes": sum(bool(i.get("invalid")) for i in infos),
            "agent/masked_token_fraction": observed / max(1, policy + observed)}
