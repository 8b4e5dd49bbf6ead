"""KL (k3, clamped k3, exact), entropy, the PPO terms and the RCE loss against hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from lever.rl.losses import (
    entropy,
    exact_kl,
    kl_k3,
    kl_k3_clamped,
    ppo_clip_loss,
    ppo_elementwise,
    ppo_terms,
    rce_loss,
)


def test_kl_k3_elementwise():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.5])
    d = [0.0, 1.0, -1.0]
    expected = [math.exp(x) - x - 1 for x in d]
    assert kl_k3(logp, ref).tolist() == pytest.approx(expected)
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_kl_k3_clamped_caps_the_log_ratio_and_agrees_inside_the_band():
    logp = torch.tensor([-1.0, -30.0, -0.5])
    ref = torch.tensor([-2.0, -1.0, -40.0])
    # d = ref - logp = -1 (inside the band of 5), 29 -> 5, -39.5 -> -5
    expected = [math.exp(x) - x - 1 for x in (-1.0, 5.0, -5.0)]
    assert kl_k3_clamped(logp, ref, log_ratio_clamp=5.0).tolist() == pytest.approx(expected, rel=1e-6)
    assert float(kl_k3(logp, ref)[1]) > 1e12  # unclamped: the overflow the clamp exists for
    assert torch.equal(kl_k3_clamped(logp[:1], ref[:1], log_ratio_clamp=5.0), kl_k3(logp[:1], ref[:1]))


def test_exact_kl_and_entropy_hand_worked_with_masked_candidates():
    # one row, two steps over K=3 candidates; -inf = masked (already chosen / outside the pool)
    p = [[0.5, 0.25, 0.25], [0.0, 0.5, 0.5]]
    q = [[0.25, 0.25, 0.5], [0.0, 0.75, 0.25]]
    lp = torch.tensor([[[math.log(x) if x else float("-inf") for x in row] for row in p]])
    lq = torch.tensor([[[math.log(x) if x else float("-inf") for x in row] for row in q]])
    kl = (0.5 * math.log(2) + 0.25 * math.log(0.5)) + (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2))
    assert float(exact_kl(lp, lq)[0]) == pytest.approx(kl, abs=1e-6)
    ent = (0.5 * math.log(2) + 2 * 0.25 * math.log(4)) + math.log(2)  # 1.5 ln 2 + ln 2
    assert float(entropy(lp)[0]) == pytest.approx(ent, abs=1e-6)
    assert float(entropy(lq)[0]) != pytest.approx(ent, abs=1e-3)


def test_one_ppo_formula_under_the_public_loss_and_the_grpo_terms():
    torch.manual_seed(0)
    logp, old, A = torch.randn(50), torch.randn(50), torch.randn(50)
    per, ratio = ppo_elementwise(logp, old, A, eps=0.2)
    assert torch.equal(ppo_clip_loss(logp, old, A, eps=0.2), per.mean())
    loss, ratio_t, _ = ppo_terms(logp, old, A, eps=0.2, log_ratio_clamp=20.0)  # |log-ratio| < 20: no clamp
    assert torch.equal(loss, per) and torch.equal(ratio_t, ratio)


def test_ppo_clip_loss_hand_worked():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))
    A = torch.tensor([1.0, 1.0, -2.0, -1.0])
    # ratio 1.5, A>0 -> min(1.5, 1.2)=1.2 ; ratio 0.5, A>0 -> min(0.5, 0.8)=0.5
    # ratio 1.1, A=-2 -> min(-2.2, -2.2) = -2.2 ; ratio 0.7, A=-1 -> min(-0.7, -0.8) = -0.8
    expected = -(1.2 + 0.5 - 2.2 - 0.8) / 4
    assert float(ppo_clip_loss(logp, old, A, eps=0.2)) == pytest.approx(expected, abs=1e-6)
    loss, ratio, clipped = ppo_terms(logp, old, A, eps=0.2)
    assert clipped.tolist() == [True, True, False, True]
    assert float(loss.mean()) == pytest.approx(expected, abs=1e-6)


def test_ppo_terms_clamp_the_log_ratio():
    loss, ratio, _ = ppo_terms(torch.tensor([100.0]), torch.tensor([0.0]), torch.tensor([-1.0]), log_ratio_clamp=5.0)
    assert float(ratio) == pytest.approx(math.exp(5.0))
    assert torch.isfinite(loss).all()


def test_rce_loss_hand_worked_with_padding():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    r = torch.tensor([[1.0, 0.0, 99.0], [0.5, 99.0, 99.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    tau = 0.5
    w1 = math.exp(2.0) / (math.exp(2.0) + 1.0)
    g1 = w1 * 1.0 + (1 - w1) * 2.0
    g2 = 3.0
    assert float(rce_loss(logp, r, mask, tau)) == pytest.approx((g1 + g2) / 2, abs=1e-6)
