"""Tests for src/dgg/chunked_logprobs.py: the lm_head applied a chunk of tokens at a time gives the log-probs and
the gradients of the full-logits path, and the trainer uses it when train.logprob_chunk is set."""

import pytest
import torch
from torch import nn

from dgg.chunked_logprobs import ChunkedTokenLogprobs, lm_head_bypassed
from dgg.config import ConfigError
from dgg.probe import LMHeadGradProbe
from dgg.rollout import completion_logprobs
from dgg.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model
from trainer_helpers import make_trainer, read_metrics, strip_timing


def full_logprobs(hidden, weight, bias, targets, temperature):
    logits = (hidden @ weight.T + (0 if bias is None else bias)) / temperature
    return torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients_equal_the_full_softmax_in_float64(chunk, with_bias):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=generator, requires_grad=True) if with_bias else None
    targets = torch.randint(11, (7,), generator=generator)
    upstream = torch.randn(7, dtype=torch.float64, generator=generator)

    expected = full_logprobs(hidden, weight, bias, targets, 0.7)
    wanted = torch.autograd.grad((expected * upstream).sum(), [hidden, weight, *([bias] if with_bias else [])])
    got = ChunkedTokenLogprobs.apply(hidden, weight, bias, targets, 0.7, chunk)
    grads = torch.autograd.grad((got * upstream).sum(), [hidden, weight, *([bias] if with_bias else [])])

    assert got.dtype == torch.float32  # log-probs are float32, as the full path returns them
    assert torch.allclose(got.double(), expected, atol=1e-6)
    # The chunked path computes in float32 (as the full path does in training), so it matches the float64
    # reference to float32's rounding: gradients of size ~5 differ by up to ~1e-6 depending on the CPU's sgemm
    # (9.3e-7 on an Intel AMX Xeon). A wrong or missing term would be off by orders of magnitude more.
    for mine, theirs in zip(grads, wanted, strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-5)


def test_gradcheck_through_the_recomputing_backward():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(6, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.tensor([0, 5, 2, 2])
    # The forward returns float32; gradcheck the float64 backward against the float64 reference instead.
    reference = torch.autograd.functional.jacobian(lambda h, w: full_logprobs(h, w, None, targets, 1.3),
                                                   (hidden, weight))
    for row in range(4):
        one_hot = torch.zeros(4, dtype=torch.float64)
        one_hot[row] = 1.0
        got = torch.autograd.grad((ChunkedTokenLogprobs.apply(hidden, weight, None, targets, 1.3, 3) * one_hot).sum(),
                                  [hidden, weight])
        assert torch.allclose(got[0], reference[0][row]) and torch.allclose(got[1], reference[1][row])


def tiny_model(tied: bool):
    tokenizer = build_char_tokenizer()
    config = TinyModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied)
    return build_tiny_model(tokenizer, config, seed=3), tokenizer


@pytest.mark.parametrize("tied", [False, True])
def test_a_model_gives_the_same_logprobs_parameter_gradients_and_lm_head_energy(tied):
    model, tokenizer = tiny_model(tied)
    encoded = tokenizer(["12+3=15", "12+3=9<eos>", "7-1=6"], return_tensors="pt", padding=True,
                        add_special_tokens=False)
    ids, mask, prompt_length = encoded["input_ids"], encoded["attention_mask"], 4
    results = []
    for chunk in (0, 5):
        model.zero_grad(set_to_none=True)
        with LMHeadGradProbe(model) as probe:
            logprobs = completion_logprobs(model, ids, mask, prompt_length, 0.8, chunk=chunk)
            (logprobs * torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)).sum().backward()
            results.append((logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                            float(probe.energy())))
    (full, full_grads, full_energy), (chunked, chunked_grads, chunked_energy) = results
    assert torch.allclose(chunked, full, atol=1e-6)
    assert full_grads.keys() == chunked_grads.keys()
    for name in full_grads:
        assert torch.allclose(chunked_grads[name], full_grads[name], atol=1e-6), name
    assert chunked_energy == pytest.approx(full_energy, rel=1e-5) and full_energy > 0
    assert isinstance(model.get_output_embeddings(), nn.Linear)  # the real lm_head is back


def test_the_lm_head_is_put_back_when_the_forward_raises():
    model, _ = tiny_model(False)
    head = model.get_output_embeddings()
    with pytest.raises(RuntimeError, match="boom"), lm_head_bypassed(model):
        raise RuntimeError("boom")
    assert model.get_output_embeddings() is head


def test_a_model_with_final_logit_softcapping_is_refused_by_name():
    model, _ = tiny_model(False)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"), lm_head_bypassed(model):
        pass


def test_the_trainer_with_chunks_trains_like_the_full_path(tiny_model_dir, tmp_path):
    runs = {}
    for chunk in (0, 3):
        trainer = make_trainer(tiny_model_dir, tmp_path / f"chunk{chunk}", "train.max_batches=2",
                               "profile.theorem2=false", "reuse.mode=fixed", "reuse.max_reuse=2",
                               f"train.logprob_chunk={chunk}")
        trainer.train()
        runs[chunk] = [r for r in strip_timing(read_metrics(trainer.run_dir)) if r["kind"] == "update"]
    assert len(runs[0]) == len(runs[3]) == 4
    for full, chunked in zip(runs[0], runs[3], strict=True):
        assert chunked["actor/pg_loss"] == pytest.approx(full["actor/pg_loss"], rel=1e-4, abs=1e-7)
        assert chunked["actor/lm_head_grad_energy"] == pytest.approx(full["actor/lm_head_grad_energy"], rel=1e-3)


def test_chunks_with_a_diagnostic_that_reads_the_full_logits_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.logprob_chunk.*profile.theorem2"):
        make_trainer(tiny_model_dir, tmp_path, "train.logprob_chunk=8")  # profile.theorem2 defaults to true


def test_the_energy_split_under_chunks_runs_the_lm_head_itself_and_matches_the_full_logits(tiny_model_dir, tmp_path):
    runs = {}
    for chunk in (0, 3):
        trainer = make_trainer(tiny_model_dir, tmp_path / f"chunk{chunk}", "train.max_batches=2",
                               "profile.theorem2=false", "profile.energy_split_every=1", "reuse.mode=fixed",
                               "reuse.max_reuse=2", "train.micro_batch_size=2", f"train.logprob_chunk={chunk}")
        trainer.train()
        runs[chunk] = [r for r in read_metrics(trainer.run_dir) if r["kind"] == "update"]
    split = [key for key in runs[0][0] if key.startswith("energy/")]
    assert sorted(split) == ["energy/neg", "energy/neg_share", "energy/pos", "energy/total"]
    assert any(r["energy/neg"] > 0 for r in runs[3]) and any(r["energy/pos"] > 0 for r in runs[3])
    for full, chunked in zip(runs[0], runs[3], strict=True):
        for key in split:
            assert chunked[key] == pytest.approx(full[key], rel=1e-3, abs=1e-9), key
        # the split's total is the probe's g_t, computed independently from the .grad of the lm_head
        assert chunked["energy/total"] == pytest.approx(chunked["actor/lm_head_grad_energy"], rel=1e-3)


def test_lm_head_gradient_parts_from_the_head_equals_from_the_logits():
    from dgg.energy_split import lm_head_gradient_parts

    torch.manual_seed(0)
    head = torch.nn.Linear(5, 11, bias=True)
    hidden = torch.randn(3, 4, 5)
    weights = torch.randn(3, 4) * (torch.rand(3, 4) > 0.3)
    targets, groups = torch.randint(0, 11, (3, 4)), torch.randint(0, 2, (3, 4))
    with torch.no_grad():
        from_logits = lm_head_gradient_parts(hidden, head(hidden), targets, weights, groups, 2, 0.7, chunk_tokens=2)
    from_head = lm_head_gradient_parts(hidden, None, targets, weights, groups, 2, 0.7, chunk_tokens=2, head=head)
    torch.testing.assert_close(from_head, from_logits)
    with pytest.raises(ValueError, match="logits or the lm_head"):
        lm_head_gradient_parts(hidden, None, targets, weights, groups, 2, 0.7)
