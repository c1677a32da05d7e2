"""GRPO pure functions against hand-computed values (no model)."""

import math

import pytest
import torch

from vlmcook.rl import grpo


def test_group_advantages_hand_values():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735 = +-0.866025
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    a = grpo.group_advantages(r)
    assert torch.allclose(a[0], torch.tensor([0.866025, -0.866025, -0.866025, 0.866025]), atol=1e-5)
    assert torch.equal(a[1], torch.zeros(4))  # zero variance: no signal, no NaN
    # [0,0,0,3]: mean 0.75, std = sqrt((3*0.5625 + 5.0625)/3) = 1.5 -> [-0.5, -0.5, -0.5, 1.5]
    assert torch.allclose(a[2], torch.tensor([-0.5, -0.5, -0.5, 1.5]), atol=1e-5)
    assert torch.allclose(grpo.group_advantages(r, scale="none")[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]))


def test_zero_variance_groups_and_bad_input():
    r = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.5, 0.5]])
    assert grpo.zero_variance_groups(r).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="NaN"):
        grpo.group_advantages(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="G >= 2"):
        grpo.group_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="unknown scale"):
        grpo.group_advantages(torch.zeros(1, 2), scale="batch")


def test_clipped_surrogate_values():
    # One token per row. rho = 1.5 with A = +1: clipped at 1.28 -> -1.28; rho = 0.5, A = +1: min(0.5, 0.8) = 0.5
    # -> -0.5; rho = 0.5, A = -1: min(-0.5, -0.8) = -0.8 -> +0.8; rho = 1.5, A = -1: min(-1.5, -1.28) -> +1.5.
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5], [0.5], [1.5]]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    mask = torch.ones(4, 1, dtype=torch.bool)
    loss, st = grpo.clipped_surrogate(logp, old, adv, mask, 0.2, 0.28)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 1.5) / 4, abs=1e-6)
    assert st["clip_frac"] == pytest.approx(0.5)  # rows 0 and 2 are clipped
    # n_tokens overrides the denominator (global token-mean over mini-batches)
    loss2, _ = grpo.clipped_surrogate(logp, old, adv, mask, n_tokens=8)
    assert loss2.item() == pytest.approx(loss.item() / 2, abs=1e-6)


def test_clipped_surrogate_masks_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    mask = torch.tensor([[True, True, False]])
    loss, _ = grpo.clipped_surrogate(logp, logp.detach(), torch.tensor([2.0]), mask)
    assert loss.item() == pytest.approx(-2.0)  # rho = 1 on both real tokens: -A each, mean over 2 tokens


def test_gradient_sign_follows_advantage():
    """Minimising the loss raises log-probs of positive-advantage tokens and lowers negative ones (inside the
    clip range); outside the clip range, the gradient is zero."""
    logp = torch.tensor([[-1.0], [-1.0]], requires_grad=True)
    old = logp.detach().clone()
    loss, _ = grpo.clipped_surrogate(logp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 1))
    loss.backward()
    assert logp.grad[0, 0] < 0 and logp.grad[1, 0] > 0  # gradient descent: +A up, -A down
    assert logp.grad.abs().flatten().tolist() == pytest.approx([0.5, 0.5])  # d(-rho A)/dlogp = -rho A / n, rho = 1
    far = torch.tensor([[math.log(2.0)]], requires_grad=True)  # rho = 2 > 1.28 with A > 0: clipped, no gradient
    l2, _ = grpo.clipped_surrogate(far, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    l2.backward()
    assert far.grad.item() == 0.0


def test_kl_and_entropy_terms():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    # k3 = exp(d) - d - 1 with d = ref - logp: token 0 d = -ln2 -> 0.5 + ln2 - 1 = 0.193147; token 1: 0
    assert grpo.kl_penalty(logp, ref, torch.ones(1, 2)).item() == pytest.approx(0.193147 / 2, abs=1e-5)
    logits = torch.zeros(1, 2, 4)  # uniform over 4: H = ln 4
    assert grpo.entropy(logits, torch.ones(1, 2)).item() == pytest.approx(math.log(4), abs=1e-6)
    loss, st = grpo.grpo_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2), ref_logp=ref, kl_coef=0.1,
                              logits=logits, entropy_coef=0.01)
    assert loss.item() == pytest.approx(0.1 * 0.193147 / 2 - 0.01 * math.log(4), abs=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.grpo_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 2), kl_coef=0.1)


def test_token_logprobs_matches_log_softmax():
    logits = torch.tensor([[[1.0, 2.0, 3.0]]])
    got = grpo.token_logprobs(logits, torch.tensor([[2]]))
    assert got.item() == pytest.approx(3 - math.log(math.exp(1) + math.exp(2) + math.exp(3)), abs=1e-6)


def test_truncation_weights_and_std_filter():
    t = torch.tensor([True, False])
    assert grpo.truncation_weights(t, "keep").tolist() == [1.0, 1.0]
    assert grpo.truncation_weights(t, "mask").tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="truncation policy"):
        grpo.truncation_weights(t, "drop")
    stds = torch.tensor([0.1, 0.4, 0.5])
    keep, ema = grpo.std_filter(stds, None, step=3)
    assert keep.all() and ema is None  # before ema_start: nothing tracked, nothing dropped
    keep, ema = grpo.std_filter(stds, None, step=6)
    assert ema == pytest.approx(1 / 3) and keep.all()  # EMA starts; filtering only from step 11
    keep, ema2 = grpo.std_filter(stds, 0.6, step=11)
    assert ema2 == pytest.approx(0.99 * 0.6 + 0.01 / 3)
    assert keep.tolist() == [False, True, True]  # threshold 0.5 * 0.59733 = 0.2987
