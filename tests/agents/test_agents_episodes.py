import json
import time

import pytest
import torch

from dgg.agents import EpisodeLimits, StepResult, register_environment, run_episodes
from dgg.agents.env import EnvironmentTask
from dgg.agents.episodes import TurnFormat
from dgg.loading import load_policy
from dgg.rollout import completion_logits, render_prompt
from dgg.run_io import load_run_config
from dgg.trainer import GRPOTrainer
from objective_helpers import papers_loss


@register_environment("test_count")
class CountEnv:
    """Ends after ``steps`` replies with reward 1; ``fail`` raises, ``hang`` sleeps, ``invalid`` calls the reply
    malformed, in the step of that number."""

    def __init__(self, steps=2, fail=None, hang=None, invalid=None):
        self.steps, self.fail, self.hang, self.invalid = steps, fail, hang, invalid

    def reset(self, seed):
        self.done = 0
        return f"go{seed % 3}"

    def step(self, action):
        self.done += 1
        if self.done == self.fail:
            raise RuntimeError("environment exploded")
        if self.done == self.hang:
            time.sleep(5)
        return StepResult(f"o{self.done}", 1.0 if self.done == self.steps else 0.0, self.done == self.steps,
                          {"invalid": self.done == self.invalid})


@pytest.fixture()
def policy(tiny_model_dir):
    from dgg.config import ModelConfig

    return load_policy(ModelConfig(path=str(tiny_model_dir)))


def play(policy, limits=None, group=2, prompts=2, **options):
    model, tokenizer = policy
    task = EnvironmentTask("test_count", options, chat=False)
    problems = [render_prompt(tokenizer, task.problem("train", i), False) for i in range(prompts)]
    torch.manual_seed(0)
    return run_episodes(model, tokenizer, task, problems, group, 3, limits or EpisodeLimits()), tokenizer


def test_observations_are_in_context_but_never_policy_tokens(policy):
    batch, tokenizer = play(policy)
    assert batch.rewards.tolist() == [1.0] * 4
    for row, info in enumerate(batch.reward_infos):
        assert info["turns"] == 2 and info.get("truncated") is None
        mask = batch.completion_mask[row]
        tokens = batch.input_ids[row, batch.prompt_length:]
        # Reply 1, then the observation "\no1\n" (masked), then reply 2.
        observation = tokenizer("\no1\n", add_special_tokens=False)["input_ids"]
        first_zero = int((mask == 0).nonzero()[0])
        assert tokens[first_zero:first_zero + len(observation)].tolist() == observation
        assert mask[first_zero:first_zero + len(observation)].sum() == 0
        assert int(mask.sum()) == info["policy_tokens"] and info["observation_tokens"] == len(observation)
        real = batch.attention_mask[row, batch.prompt_length:].sum()
        assert int(real) == info["policy_tokens"] + info["observation_tokens"]  # attends to observations too


def test_no_gradient_flows_from_observation_tokens(policy):
    batch, _ = play(policy)
    model = policy[0]
    logits = completion_logits(model, batch.input_ids, batch.attention_mask, batch.prompt_length)
    logits.retain_grad()
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, batch.input_ids[:, batch.prompt_length:, None])[..., 0]
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, _ = papers_loss(logprobs, logprobs.detach() - 0.1, advantages, batch.completion_mask)
    loss.backward()
    per_position = logits.grad.abs().sum(-1)
    assert per_position[batch.completion_mask == 0].max() == 0
    assert (per_position[batch.completion_mask == 1] > 0).all()


def test_limits_end_episodes_with_their_reward_so_far(policy):
    batch, _ = play(policy, EpisodeLimits(max_turns=1), steps=2)
    assert batch.rewards.tolist() == [0.0] * 4
    assert all(i["truncated"] == "turns" and i["turns"] == 1 for i in batch.reward_infos)
    batch, _ = play(policy, EpisodeLimits(max_turns=5, max_episode_tokens=6), steps=4)
    assert all(i["truncated"] == "tokens" for i in batch.reward_infos)
    assert batch.input_ids.shape[1] - batch.prompt_length <= 6


def test_an_episode_with_one_malformed_reply_stays_invalid_after_valid_ones(policy):
    batch, _ = play(policy, steps=3, invalid=1)
    assert all(i["invalid"] and i["invalid_replies"] == 1 for i in batch.reward_infos)
    batch, _ = play(policy, steps=3)
    assert not any(i["invalid"] or i["invalid_replies"] for i in batch.reward_infos)


def test_an_environment_that_raises_or_hangs_scores_zero_and_the_rest_go_on(policy):
    batch, _ = play(policy, fail=2)
    assert batch.rewards.tolist() == [0.0] * 4
    assert all(i["env_error"] == "RuntimeError: environment exploded" for i in batch.reward_infos)
    started = time.perf_counter()
    batch, _ = play(policy, EpisodeLimits(env_timeout_s=0.2), group=2, prompts=1, hang=1)
    assert time.perf_counter() - started < 3
    assert all(i["env_error"] == "timeout after 0.2 s" for i in batch.reward_infos)


def test_turns_follow_the_chat_template(policy):
    _, tokenizer = policy
    tokenizer.chat_template = ("{% for m in messages %}({{ m.role }}){{ m.content }}<eos>{% endfor %}"
                               "{% if add_generation_prompt %}(assistant){% endif %}")
    turns = TurnFormat(tokenizer, chat=True)
    assert (turns.before, turns.after) == ("<eos>(user)", "<eos>(assistant)")
    ended = tokenizer.decode(turns.observation_ids("o1", reply_ended=True))
    assert ended == "(user)o1<eos>(assistant)"  # the reply's own <eos> is not repeated
    assert tokenizer.decode(turns.observation_ids("o1", reply_ended=False)) == "<eos>(user)o1<eos>(assistant)"


TINY_AGENT = ["task.name=search_qa", "task.options={hops: 1, people: 10}", "rollout.prompts_per_batch=2",
              "rollout.group_size=2", "rollout.max_new_tokens=3", "agent.max_turns=2", "agent.max_episode_tokens=400",
              "eval.every=2", "eval.problems=2", "eval.samples=1", "profile.weights_every=0", "output.progress=false",
              "train.threads=1", "task.test_size=4", "reuse.mode=dgg", "reuse.max_reuse=2", "optim.lr=1e-2",
              "train.checkpoint_every=2"]


def test_an_agent_run_trains_logs_episodes_and_resumes_exactly(tiny_model_dir, tmp_path):
    from dgg.config import load_config

    pytest.importorskip("bm25s")

    def trainer(out, *extra):
        return GRPOTrainer(load_config(None, [f"model.path={tiny_model_dir}", f"output.dir={out}", *TINY_AGENT,
                                              *extra]))

    whole = trainer(tmp_path / "whole", "train.max_batches=4")
    whole.train()
    first = trainer(tmp_path / "cut", "train.max_batches=2")
    first.train()
    resumed = GRPOTrainer(load_run_config(first.run_dir, ["train.max_batches=4"]), resume_from=first.run_dir)
    resumed.train()

    def records(run):
        rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("perf/")
                 and k not in ("wall_time", "rollout/seconds", "rollout/scoring_seconds")} for r in rows]

    assert records(resumed) == records(whole)
    rollouts = [r for r in records(whole) if r["kind"] == "rollout"]
    assert len(rollouts) == 4 and all(0 < r["agent/masked_token_fraction"] < 1 for r in rollouts)
    assert {"agent/turns_mean", "agent/truncated", "agent/env_errors"} <= set(rollouts[0])
    assert any(r["kind"] == "eval" for r in records(whole))
