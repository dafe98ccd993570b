"""Samplers behind the rollout step: the HF one is today's path bit for bit, every sampler returns the same
layout, and the trainer tells the sampler when the policy changed."""

import pytest
import torch

from dgg.config import load_config
from dgg.loading import load_policy
from dgg.rollout import sample_rollouts
from dgg.samplers import HFSampler, batch_from_token_ids, make_sampler
from dgg.tasks import Problem
from dgg.trainer import GRPOTrainer

PROBLEMS = [Problem(prompt="1+2=", answer="3", meta={}), Problem(prompt="12+30=", answer="42", meta={})]


def test_batch_from_token_ids_by_hand():
    batch = batch_from_token_ids(PROBLEMS, [[5, 6], [7]], [[1, 2, 9, 4], [3]], pad_token_id=0, eos_token_id=9)
    assert batch.prompt_length == 2
    assert batch.input_ids.tolist() == [[5, 6, 1, 2, 9, 4], [0, 7, 3, 0, 0, 0]]
    assert batch.completion_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]  # up to and including EOS
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]]


def test_an_engine_sampler_layout_matches_generate(tiny_model_dir):
    config = load_config(None, [f"model.path={tiny_model_dir}"])
    model, tokenizer = load_policy(config.model)
    torch.manual_seed(0)
    batch = sample_rollouts(model, tokenizer, PROBLEMS, 3, 5, 1.0)
    # what an engine returns: ragged prompt and completion ids, EOS kept, nothing after it
    prompts = [row[m.bool()].tolist() for row, m in zip(batch.input_ids[:, :batch.prompt_length],
                                                          batch.attention_mask[:, :batch.prompt_length])]
    completions = [row[m.bool()].tolist() for row, m in zip(batch.input_ids[:, batch.prompt_length:],
                                                              batch.completion_mask)]
    rebuilt = batch_from_token_ids(batch.problems, prompts, completions, tokenizer.pad_token_id,
                                   tokenizer.eos_token_id)
    width = rebuilt.input_ids.shape[1]
    assert torch.equal(rebuilt.completion_mask, batch.completion_mask[:, :width - batch.prompt_length])
    assert torch.equal(rebuilt.attention_mask, batch.attention_mask[:, :width])
    active = rebuilt.attention_mask.bool()
    assert torch.equal(rebuilt.input_ids[active], batch.input_ids[:, :width][active])


def test_the_hf_sampler_is_todays_generate_bit_for_bit(tiny_model_dir):
    config = load_config(None, [f"model.path={tiny_model_dir}"])
    model, tokenizer = load_policy(config.model)
    torch.manual_seed(1)
    direct = sample_rollouts(model, tokenizer, PROBLEMS, 2, 4, 0.7, 0.9)
    torch.manual_seed(1)
    via = HFSampler(model, tokenizer).sample(PROBLEMS, 2, 4, 0.7, 0.9)
    assert torch.equal(direct.input_ids, via.input_ids) and direct.completions == via.completions


def test_the_trainer_tells_the_sampler_each_time_the_policy_changed(tiny_model_dir, tmp_path):
    config = load_config(None, [f"model.path={tiny_model_dir}", f"output.dir={tmp_path}", "reuse.mode=fixed",
                                "reuse.max_reuse=3", "train.max_batches=2", "eval.every=0", "output.progress=false",
                                "rollout.prompts_per_batch=2", "rollout.group_size=4", "rollout.max_new_tokens=4",
                                "profile.weights_every=0", "task.test_size=4"])
    trainer = GRPOTrainer(config)
    changes = []
    inner = trainer.sampler
    trainer.sampler = type("Counting", (), {"sample": lambda self, *a: inner.sample(*a),
                                            "policy_changed": lambda self: changes.append(trainer.state.updates)})()
    trainer.train()
    assert changes == list(range(trainer.state.updates)) and trainer.state.updates == 6  # once per applied step


def test_unknown_and_unavailable_samplers_say_what_to_do():
    from dgg.config import ConfigError
    from dgg.errors import UserError

    with pytest.raises(ConfigError, match="rollout.sampler must be hf or vllm"):
        load_config(None, ["rollout.sampler=sglang"])
    with pytest.raises(UserError, match="rollout.sampler"):
        make_sampler("sglang", None, None, "fp32")


@pytest.mark.gpu
def test_vllm_sampler_generates_and_syncs_weights(tiny_model_dir):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    config = load_config(None, [f"model.path={tiny_model_dir}", "model.device=cuda"])
    model, tokenizer = load_policy(config.model)
    sampler = make_sampler("vllm", model, tokenizer, "fp32", str(tiny_model_dir))
    batch = sampler.sample(PROBLEMS, 4, 6, 1.0, 1.0)
    assert batch.size == 8 and batch.completion_mask.sum() > 0 and sampler.syncs == 0
    sampler.policy_changed()
    sampler.sample(PROBLEMS, 2, 4, 1.0, 1.0)
    assert sampler.syncs == 1
