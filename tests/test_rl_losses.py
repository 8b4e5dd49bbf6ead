"""kl_k3, ppo_clip_loss and the RCE loss against hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from lever.rl.losses import kl_k3, ppo_clip_loss, ppo_terms, rce_loss


def test_kl_k3_elementwise():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.5])
    d = [0.0, 1.0, -1.0]
    expected = [math.exp(x) - x - 1 for x in d]
    assert kl_k3(logp, ref).tolist() == pytest.approx(expected)
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


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
