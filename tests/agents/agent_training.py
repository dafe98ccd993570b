"""Helpers of the environments' tests: one scripted episode, and two batches of DGG-reuse training on the tiny model."""

import json


def play(env, policy, seed, turns=30):
    """The last step's result of an episode in which ``policy(env, step)`` writes each reply; None if it ran to
    ``turns`` without ending."""
    env.reset(seed)
    for step in range(turns):
        result = env.step(policy(env, step))
        if result.done:
            return result
    return None


def train_on_environment(model_dir, run_dir, name: str, options: str) -> list[dict]:
    """The run's rollout rows after 2 batches of 2 × 2 episodes (≤ 2 turns of ≤ 4 tokens, K ≤ 2)."""
    from dgg.config import load_config
    from dgg.trainer import GRPOTrainer

    config = load_config(None, [f"model.path={model_dir}", f"output.dir={run_dir}", f"task.name={name}",
                                f"task.options={options}", "rollout.prompts_per_batch=2", "rollout.group_size=2",
                                "rollout.max_new_tokens=4", "agent.max_turns=2", "agent.max_episode_tokens=4000",
                                "eval.every=0", "profile.weights_every=0", "output.progress=false",
                                "train.threads=1", "train.max_batches=2", "reuse.mode=dgg", "reuse.max_reuse=2"])
    trainer = GRPOTrainer(config)
    trainer.train()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "rollout"]
