"""The objective registry: hand-computed cases for each entry, micro-batch invariance of every aggregation,
and DGG training with each registered choice."""

import itertools
import math

import pytest
import torch

from dgg.algos import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    TOKEN_CREDIT,
    TOKEN_MASKS,
    ClipSettings,
    CreditSettings,
    Objective,
)
from dgg.algos.aggregation import micro_loss
from dgg.config import ConfigError, load_config, make_objective
from dgg.errors import UserError
from dgg.reuse.statistics import masked_mean


def test_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert torch.allclose(ADVANTAGES["grpo"](rewards, 4)[:4], torch.tensor([1, -1, -1, 1]) * 0.5 / (std + 1e-6))
    assert torch.equal(ADVANTAGES["drgrpo"](rewards, 4)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    rloo = ADVANTAGES["rloo"](rewards, 4)  # 1 − mean(0, 0, 1) = 2/3
    assert torch.allclose(rloo[:4], torch.tensor([2, -2, -2, 2]) / 3)
    for name in ADVANTAGES.names():  # a group with equal rewards carries no signal under any estimator
        assert torch.equal(ADVANTAGES[name](rewards, 4)[4:], torch.zeros(4)), name


DEFAULT_CLIP = ClipSettings()


def _one_token(log_ratio: float, advantage: float, loss: str, settings=DEFAULT_CLIP):
    logprobs = torch.tensor([[-1.0 + log_ratio]], requires_grad=True)
    value = POLICY_LOSSES[loss](logprobs, torch.tensor([[-1.0]]), torch.tensor([[advantage]]), torch.ones(1, 1),
                                settings)
    value.sum().backward()
    return float(value.detach()), float(logprobs.grad)


def test_policy_losses_by_hand():
    r = 1.5
    assert _one_token(math.log(r), 1.0, "ppo_clip") == pytest.approx((-1.2, 0.0))  # clipped: no gradient
    assert _one_token(math.log(r), -1.0, "ppo_clip") == pytest.approx((1.5, 1.5))  # pessimistic side kept
    assert _one_token(math.log(r), 1.0, "ppo_clip", ClipSettings(clip_eps_high=0.6)) == pytest.approx((-1.5, -1.5))
    # CISPO: weight clip(1.5) = 1.2, detached; the gradient of −1.2·A·log π survives the clip
    assert _one_token(math.log(r), 1.0, "cispo") == pytest.approx((-1.2 * 1.0 * (-1.0 + math.log(r)), -1.2))


def test_gspo_uses_the_sequence_ratio():
    logprobs = torch.tensor([[-1.0 + 0.1, -1.0 + 0.3, 5.0]], requires_grad=True)  # third token is masked
    old, mask = torch.tensor([[-1.0, -1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    s = math.exp(0.2)  # exp(mean log r over the two active tokens)
    up = POLICY_LOSSES["gspo"](logprobs, old, torch.full((1, 3), 1.0), mask, ClipSettings())
    assert up[0, 0].item() == pytest.approx(-(1 + 4e-4))  # clipped at 1 + 4e-4
    down = POLICY_LOSSES["gspo"](logprobs, old, torch.full((1, 3), -1.0), mask, ClipSettings())
    assert down[0, 0].item() == pytest.approx(s)
    (down[0, 0]).backward()  # d s / d log π_t = s / |y| on each active token, 0 on the masked one
    assert logprobs.grad[0].tolist() == pytest.approx([s / 2, s / 2, 0.0])


def test_aggregations_by_hand():
    per_token = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]])

    def total(name):
        w, z = AGGREGATIONS[name](mask, 2, 3)
        return float(micro_loss(per_token, w, z))

    assert total("token-mean") == pytest.approx((2 + 3 + 4) / 5)
    assert total("seq-mean-token-mean") == pytest.approx((2 + 1 + 4) / 3)  # the empty row counts for nothing
    assert total("group-mean-token-mean") == pytest.approx(((2 + 3) / 4 + 4 / 1) / 2)
    assert total("seq-mean-token-sum-norm") == pytest.approx((2 + 3 + 4) / (4 * 3))


@pytest.mark.parametrize("name", AGGREGATIONS.names())
def test_every_aggregation_adds_up_over_micro_batches(name):
    generator = torch.Generator().manual_seed(0)
    per_token = torch.randn(8, 5, generator=generator)
    mask = (torch.rand(8, 5, generator=generator) > 0.3).float()
    w, z = AGGREGATIONS[name](mask, 4, 5)
    whole = micro_loss(per_token, w, z)
    parts = sum(micro_loss(per_token[r], w[r], z[r]) * float(z[r].sum() / z.sum())
                for r in (slice(0, 3), slice(3, 5), slice(5, 8)))
    assert float(parts) == pytest.approx(float(whole), rel=1e-6)


def test_kl_estimators_by_hand():
    logprobs, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert float(KL_ESTIMATORS["k1"](logprobs, ref)) == pytest.approx(1.0)
    assert float(KL_ESTIMATORS["k2"](logprobs, ref)) == pytest.approx(0.5)
    assert float(KL_ESTIMATORS["k3"](logprobs, ref)) == pytest.approx(math.exp(-1) + 1 - 1)


def test_token_credit_by_hand():
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    logprobs = torch.log(torch.tensor([[0.001, 0.5, 0.001]]))
    entropy = torch.tensor([[0.1, 0.1, 0.1]])
    mask = torch.ones(1, 3)
    _, kept = TOKEN_CREDIT["stapo"](advantages, logprobs, entropy, mask, CreditSettings())
    assert kept.tolist() == [[0.0, 1.0, 1.0]]  # unlikely + confident + positive advantage: silenced
    _, kept = TOKEN_CREDIT["stapo"](advantages, logprobs, torch.full((1, 3), 2.0), mask, CreditSettings())
    assert kept.tolist() == [[1.0, 1.0, 1.0]]  # an unsure position is exploration, not an accident
    scaled, _ = TOKEN_CREDIT["eapo"](advantages, logprobs, torch.tensor([[2.0, 1.0, 0.0]]), mask, CreditSettings())
    assert scaled[0].tolist() == pytest.approx([1.5, 1.0, -0.5])  # mean entropy 1: 1 + 0.5·(H − 1)


def test_m2po_mask_by_hand():
    # Active tokens' log r: 0.5, -0.3, 0.1, 0.0 -> (log r)² 0.25, 0.09, 0.01, 0; the fourth column is padding.
    log_ratio = torch.tensor([[0.5, -0.3, 9.0], [0.1, 0.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # Means of the tokens left after dropping the i largest: 0.0875, 0.0333, 0.005, 0.
    assert TOKEN_MASKS["m2po"](log_ratio, mask, 0.04).tolist() == [[0, 1, 0], [1, 1, 0]]
    assert TOKEN_MASKS["m2po"](log_ratio, mask, 0.01).tolist() == [[0, 0, 0], [1, 1, 0]]
    assert TOKEN_MASKS["m2po"](log_ratio, mask, 0.1).tolist() == mask.tolist()  # already below: nothing dropped
    assert TOKEN_MASKS["m2po"](log_ratio, mask, 0.0).tolist() == [[0, 0, 0], [0, 1, 0]]  # never below: keep one
    assert TOKEN_MASKS["none"](log_ratio, mask, 0.04) is mask


def test_the_m2po_mask_takes_its_tokens_out_of_the_loss_but_not_out_of_the_normaliser():
    logprobs = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0], [-1.0, -1.0]])  # token (0, 0): log r = 0.5, (log r)² = 0.25
    advantages, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 2)
    objective = Objective(token_mask="m2po", m2_threshold=0.04)  # mean (log r)² 0.0625 -> drop that token
    w, z = objective.token_weights(mask, 2, 2)
    loss, extras = objective.loss_of(logprobs, old, advantages, mask, w, z)
    # token-mean over all 4 positions of -A·clip(r): tokens kept (1, 1, 1) with r = 1 -> -(1 - 1 - 1) / 4.
    assert float(loss) == pytest.approx(1 / 4) and float(extras["masked_tokens"]) == 1.0
    loss.backward()
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 1] == pytest.approx(-1 / 4)
    assert not objective.is_papers_surrogate
    with pytest.raises(ConfigError, match="algo.token_mask"):
        load_config(None, ["algo.token_mask=m3po"])
    with pytest.raises(ConfigError, match="algo.m2_threshold"):
        load_config(None, ["algo.m2_threshold=0"])


def test_the_default_objective_is_the_papers_loss():
    generator = torch.Generator().manual_seed(1)
    logprobs = torch.randn(6, 4, generator=generator).requires_grad_()
    old, ref = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    advantages, mask = torch.randn(6, generator=generator), (torch.rand(6, 4, generator=generator) > 0.2).float()
    objective = Objective(kl_coef=0.1)
    w, z = objective.token_weights(mask, 2, 4)
    loss, extras = objective.loss_of(logprobs, old, advantages, mask, w, z, ref)
    # Eq. 1 written out: −mean over active tokens of min(r·Â, clip(r)·Â), plus 0.1 × the k3 KL to the reference.
    ratio = torch.exp(logprobs - old)
    surrogate = torch.minimum(ratio * advantages[:, None], torch.clamp(ratio, 0.8, 1.2) * advantages[:, None])
    log_ref = ref - logprobs
    kl = masked_mean(torch.exp(log_ref) - log_ref - 1.0, mask)
    torch.testing.assert_close(loss, -masked_mean(surrogate, mask) + 0.1 * kl, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(extras["ref_kl"], kl.detach(), rtol=1e-6, atol=1e-7)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UserError, match="algo.loss: unknown policy loss 'nope'; valid: ppo_clip, gspo, cispo"):
        Objective(loss="nope")
    with pytest.raises(ConfigError, match="algo.aggregation must be one of token-mean"):
        load_config(None, ["algo.aggregation=mean"])
    with pytest.raises(ConfigError, match="algo.kl_in"):
        load_config(None, ["algo.kl_in=value"])
    assert make_objective(load_config(None, ["algo.advantage=drgrpo"])).advantage == "drgrpo"


def test_the_old_loss_section_is_accepted_under_its_new_names_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning, match="loss.kl_coef is now algo.kl_coef"):
        config = load_config(None, ["loss.kl_coef=0.1", "loss.clip_eps=0.3"])
    assert (config.algo.kl_coef, config.algo.clip_eps) == (0.1, 0.3)
    with pytest.warns(FutureWarning, match="algo.advantage=drgrpo"):
        assert make_objective(load_config(None, ["loss.scale_advantages=false"])).advantage == "drgrpo"
    old_run = tmp_path / "config.yaml"  # what a run saved before the rename: it still loads and resumes
    old_run.write_text("loss:\n  clip_eps: 0.25\n  scale_advantages: true\n")
    with pytest.warns(FutureWarning):
        assert load_config(old_run).algo.clip_eps == 0.25
    with pytest.raises(ConfigError, match="loss.kl_coef=0.1 and algo.kl_coef=0.2 disagree"):
        load_config(None, ["loss.kl_coef=0.1", "algo.kl_coef=0.2"])
    with pytest.raises(ConfigError, match="unknown config key loss.beta"):
        load_config(None, ["loss.beta=0.1"])


def test_every_combination_gives_a_finite_loss_whose_gradient_follows_the_advantage():
    generator = torch.Generator().manual_seed(2)
    old = torch.randn(8, 5, generator=generator) - 2
    ref = old + 0.1 * torch.randn(8, 5, generator=generator)
    rewards = (torch.rand(8, generator=generator) > 0.5).float()
    mask = (torch.rand(8, 5, generator=generator) > 0.2).float()
    entropy = torch.rand(8, 5, generator=generator)
    combos = itertools.product(ADVANTAGES.names(), POLICY_LOSSES.names(), AGGREGATIONS.names(),
                               KL_ESTIMATORS.names(), ("loss", "reward"), TOKEN_CREDIT.names())
    count = 0
    for advantage, loss, aggregation, kl, place, credit in combos:
        objective = Objective(advantage, loss, aggregation, kl, place, credit, kl_coef=0.05)
        logprobs = (old + 0.05 * torch.randn(8, 5, generator=generator)).requires_grad_()
        penalty = objective.sequence_kl(old, ref, mask)
        advantages = objective.advantages(rewards, 4, penalty)
        w, z = objective.token_weights(mask, 4, 5)
        value, _ = objective.loss_of(logprobs, old, advantages, mask, w, z, ref, entropy)
        value.backward()
        assert math.isfinite(float(value.detach())) and torch.isfinite(logprobs.grad).all(), objective
        assert logprobs.grad[mask == 0].abs().max() == 0, objective  # padding never gets a gradient
        # At π_θ = π_old (no ratio clipped), descending the loss raises log π of the best completion's tokens and
        # lowers the worst's (summed over their active tokens: the KL term may move single tokens either way).
        at_old = old.clone().requires_grad_()
        objective.loss_of(at_old, old, advantages, mask, w, z, ref, entropy)[0].backward()
        best, worst = int(advantages.argmax()), int(advantages.argmin())
        assert float((at_old.grad[best] * mask[best]).sum()) < 0 < float((at_old.grad[worst] * mask[worst]).sum()), \
            objective
        count += 1
    assert count == 3 * 3 * 4 * 3 * 2 * 3
