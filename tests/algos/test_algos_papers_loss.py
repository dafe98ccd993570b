"""The paper's advantages and loss (Eq. 1–2) as dgg.algos computes them, and the ratio statistics the rules read
(dgg.reuse.statistics), on hand-computed cases."""

import math

import pytest
import torch

from dgg.algos import KL_ESTIMATORS
from dgg.algos.advantages import group_advantages
from dgg.reuse.statistics import masked_mean
from objective_helpers import papers_loss


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    adv = group_advantages(rewards, group_size=3, eps=0.0)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert adv[:3].tolist() == pytest.approx([(2 / 3) / std, -(1 / 3) / std, -(1 / 3) / std])
    assert adv[3:].tolist() == pytest.approx([-(2 / 3) / std, (1 / 3) / std, (1 / 3) / std])


def test_group_advantages_constant_group_is_zero_and_dr_grpo_centres_only():
    rewards = torch.tensor([0.5, 0.5, 1.0, 0.0])
    assert group_advantages(rewards, 2)[:2].tolist() == [0.0, 0.0]
    assert group_advantages(rewards, 2, scale_by_std=False).tolist() == [0.0, 0.0, 0.5, -0.5]


def test_group_advantages_shape_error():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(5), 2)


def test_surrogate_at_ratio_one_is_mean_advantage_and_gradient_matches_eq2():
    old = torch.log(torch.tensor([[0.5, 0.25, 0.1], [0.2, 0.4, 0.9]]))
    new = old.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, stats = papers_loss(new, old, adv, mask, clip_eps=0.2)
    assert float(loss) == pytest.approx(-(1 + 1 - 2 - 2 - 2) / 5)
    loss.backward()
    # Eq. 2: d(-L)/d log π_i = -r_i Â_i / T with r = 1
    expected = -torch.tensor([[1.0, 1.0, 0.0], [-2.0, -2.0, -2.0]]) / 5
    assert torch.allclose(new.grad, expected)
    assert float(stats["chi2"]) == pytest.approx(0.0) and float(stats["kl"]) == pytest.approx(0.0)
    assert float(stats["clip_ratio"]) == 0.0


def test_clipping_is_asymmetric_negative_advantage_with_large_ratio_stays_unclipped():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[3.0, 3.0]])).requires_grad_(True)  # r = 3
    adv = torch.tensor([-1.0])
    mask = torch.ones(1, 2)
    loss, stats = papers_loss(new, old, adv, mask, clip_eps=0.2)
    assert float(loss) == pytest.approx(3.0)  # min(3·(−1), 1.2·(−1)) = −3, negated
    loss.backward()
    assert torch.allclose(new.grad, torch.full((1, 2), 3.0 / 2))  # gradient r·|Â|/T flows
    assert float(stats["clip_ratio"]) == 0.0
    assert float(stats["chi2"]) == pytest.approx(8.0) and float(stats["ratio_max"]) == pytest.approx(3.0)
    # positive advantage: clipped at 1.2, no gradient
    new2 = torch.log(torch.tensor([[3.0, 3.0]])).requires_grad_(True)
    loss2, stats2 = papers_loss(new2, old, torch.tensor([1.0]), mask, clip_eps=0.2)
    loss2.backward()
    assert float(loss2) == pytest.approx(-1.2) and torch.all(new2.grad == 0)
    assert float(stats2["clip_ratio"]) == 1.0


def test_clip_eps_high():
    old = torch.zeros(1, 1)
    new = torch.log(torch.tensor([[1.5]]))
    loss, _ = papers_loss(new, old, torch.tensor([1.0]), torch.ones(1, 1), 0.2, clip_eps_high=0.28)
    assert float(loss) == pytest.approx(-1.28)


def test_kl_estimates_are_k3():
    lp, old = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    _, stats = papers_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 1))
    assert float(stats["kl"]) == pytest.approx(2 - 1 - math.log(2))
    assert float(masked_mean(KL_ESTIMATORS["k3"](lp, old), torch.ones(1, 1))) == pytest.approx(0.5 - math.log(0.5) - 1)


def test_masked_mean_ignores_masked_values():
    assert float(masked_mean(torch.tensor([1.0, 100.0]), torch.tensor([1.0, 0.0]))) == 1.0


def test_the_kl_stops_statistics_are_the_algos_registrys_estimators_of_kl_to_pi_old():
    from dgg.reuse.statistics import ratio_statistics
    from dgg.reuse_rules import KL_STOP_SIGNALS

    generator = torch.Generator().manual_seed(3)
    old, new = torch.randn(4, 5, generator=generator), torch.randn(4, 5, generator=generator)
    mask = (torch.rand(4, 5, generator=generator) > 0.3).float()
    stats = ratio_statistics(new, old, torch.ones(4), mask)
    # KL(π_old ‖ π_θ) estimated on tokens sampled from π_old: the registry's estimator with π_old in the first slot.
    assert set(KL_STOP_SIGNALS) <= set(KL_ESTIMATORS.names())
    assert float(stats["kl"]) == pytest.approx(float(masked_mean(KL_ESTIMATORS["k3"](old, new), mask)), rel=1e-6)
    assert -float(stats["log_ratio_mean"]) == pytest.approx(float(masked_mean(KL_ESTIMATORS["k1"](old, new), mask)),
                                                           rel=1e-6)
