"""The lm_head energy split by the sign of the advantage equals autograd's lm_head gradient of each part."""

from __future__ import annotations

import pytest
import torch

from dgg.energy_split import lm_head_gradient_part, lm_head_gradient_parts, token_gradient_weights
from trainer_helpers import make_trainer, read_metrics


def test_the_parts_sum_to_the_probes_energy_and_each_part_is_autograds(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, "eval.every=0", "reuse.mode=fixed",
                           "profile.energy_split_every=1", "train.micro_batch_size=6", "optim.lr=0.05")
    torch.manual_seed(0)
    batch = trainer.collect_rollouts()
    assert (batch.advantages < 0).any() and (batch.advantages > 0).any()
    assert trainer.update(batch, 1)  # after one step the ratios differ from 1 and some tokens are clipped
    record = [r for r in read_metrics(trainer.run_dir) if r["kind"] == "update"][-1]
    assert record["energy/total"] == pytest.approx(record["actor/lm_head_grad_energy"], rel=1e-4)

    def backward(rollouts):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.probe.reset()
        observers = [o for o in trainer.observers if o.begin(0)]  # the energy split observes every attempt
        trainer._backward(rollouts, observers)  # the statistics go to the controller, the forward to observers
        energy = float(trainer.probe.energy())
        return energy, {**trainer._observe(observers, "finish", energy),
                        **trainer.controller.decide(2, energy).statistics}

    energy, stats = backward(batch)  # k = 2, at the weights the split is measured on
    assert stats["clip_ratio"] > 0
    assert stats["energy/total"] == pytest.approx(energy, rel=1e-4)
    assert stats["energy/neg_share"] == pytest.approx(stats["energy/neg"] / (stats["energy/neg"] + stats["energy/pos"]))
    for name, keep in (("neg", batch.advantages < 0), ("pos", batch.advantages > 0)):
        part = batch.select(slice(None))  # the same loss with only one sign's advantages kept (T unchanged)
        part.advantages = torch.where(keep, batch.advantages, 0.0)
        assert backward(part)[0] == pytest.approx(stats[f"energy/{name}"], rel=1e-4), name
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.probe.reset()


def test_clipped_tokens_carry_no_weight_and_the_softmax_term_is_exact():
    log_ratio = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]]))
    advantages = torch.tensor([1.0, -1.0])
    weights = token_gradient_weights(log_ratio, advantages, torch.ones(2, 3), total_tokens=6.0, clip_eps=0.2)
    # A > 0 and r = 1.5 > 1.2: clipped; A < 0 and r = 0.5 < 0.8: clipped; the rest: −r Â / T.
    torch.testing.assert_close(weights, torch.tensor([[-1 / 6, 0.0, -0.5 / 6], [1 / 6, 1.5 / 6, 0.0]]))

    gen = torch.Generator().manual_seed(0)
    hidden, logits = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 5, generator=gen)
    targets = torch.randint(0, 5, (2, 3), generator=gen)
    expected = torch.zeros(5, 4)
    for n in range(2):
        for t in range(3):
            error = torch.nn.functional.one_hot(targets[n, t], 5).float() - torch.softmax(logits[n, t] / 0.7, -1)
            expected += weights[n, t] * torch.outer(error, hidden[n, t]) / 0.7
    got = lm_head_gradient_part(hidden, logits, targets, weights, temperature=0.7, chunk_tokens=2)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_grouped_products_match_and_the_diagnostic_is_off_the_training_clock(tiny_model_dir, tmp_path):
    gen = torch.Generator().manual_seed(1)
    hidden, logits = torch.randn(3, 4, 16, generator=gen), torch.randn(3, 4, 64, generator=gen)
    targets, weights = torch.randint(0, 64, (3, 4), generator=gen), torch.randn(3, 4, generator=gen)
    groups = torch.randint(0, 2, (3, 4), generator=gen)
    both = lm_head_gradient_parts(hidden, logits, targets, weights, groups, 2, 0.7, chunk_tokens=5)
    for g in range(2):  # one product for both groups = each group on its own
        alone = lm_head_gradient_part(hidden, logits, targets, torch.where(groups == g, weights, 0.0), 0.7)
        torch.testing.assert_close(both[g], alone, atol=1e-6, rtol=1e-5)

    import time

    from dgg import energy_split as trainer_module  # the class the energy-split observer uses

    trainer = make_trainer(tiny_model_dir, tmp_path, "eval.every=0", "profile.energy_split_every=1")
    slow_add = trainer_module.EnergySplit.add

    def add(self, *args, **kwargs):
        time.sleep(0.3)
        return slow_add(self, *args, **kwargs)

    trainer_module.EnergySplit.add = add
    try:
        batch = trainer.collect_rollouts()
        before = trainer.state.wall_time
        started = trainer._clock = time.perf_counter()  # the training clock runs from here
        assert trainer.update(batch, 1)
        elapsed = time.perf_counter() - started
    finally:
        trainer_module.EnergySplit.add = slow_add
    assert elapsed >= 0.3 and trainer.state.wall_time - before < elapsed - 0.25
