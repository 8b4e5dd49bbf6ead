"""Every loss, KL and entropy term of RCE and GRPO (SPEC sections 4 and 8), in one tested place.

Public (SPEC section 8): :func:`kl_k3`, :func:`ppo_clip_loss`.  The rest are the forms the trainers
use: the clamped k3 and the PPO terms of GRPO, the exact KL and entropy over the pointer's candidate
distributions (``[B, S, K]`` step log-probs from :func:`lever.selectors.pointer.step_logprobs`), and
the RCE loss over padded groups.  There is one PPO formula, :func:`ppo_elementwise`: the public
scalar loss is its mean, GRPO's :func:`ppo_terms` adds the log-ratio clamp and the clip statistics.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "kl_k3", "kl_k3_clamped", "exact_kl", "entropy",
    "ppo_elementwise", "ppo_clip_loss", "ppo_terms", "rce_loss",
]


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Elementwise k3 estimator of KL(policy || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def kl_k3_clamped(logp: torch.Tensor, ref_logp: torch.Tensor, *, log_ratio_clamp: float) -> torch.Tensor:
    """k3 with the log-ratio ``ref - logp`` clamped to +-``log_ratio_clamp``, like GRPO's PPO ratio.

    Why: on off-policy group candidates the policy may sit tens of nats below the reference and
    exp() would overflow to inf.  Written as k3 against the shifted reference ``logp + clamp(d)``
    (not ``exp(c) - c - 1`` directly) so the training numbers stay bit-identical to before the move.
    """
    return kl_k3(logp, logp + (ref_logp - logp).clamp(-log_ratio_clamp, log_ratio_clamp))


def exact_kl(step_lp: torch.Tensor, ref_step_lp: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) per row [B], summed over steps of the full candidate distributions.

    Both are evaluated along the same (teacher-forced) prefix, so each step's support is identical;
    ``-inf`` entries (probability 0 under both) contribute 0.
    """
    p = step_lp.exp()
    diff = torch.where(torch.isfinite(step_lp), step_lp - ref_step_lp, torch.zeros_like(step_lp))
    return (p * diff).sum(-1).sum(-1)


def entropy(step_lp: torch.Tensor) -> torch.Tensor:
    """Per-row entropy [B] of the candidate distributions, summed over steps (``-inf`` entries add 0)."""
    p = step_lp.exp()
    plogp = torch.where(torch.isfinite(step_lp), p * step_lp, torch.zeros_like(step_lp))
    return -plogp.sum(-1).sum(-1)


def ppo_elementwise(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps: float = 0.2,
    log_ratio_clamp: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one PPO-clip formula: per-element ``-min(ratio*A, clip(ratio, 1-eps, 1+eps)*A)`` and ratio.

    ``ratio = exp(logp - old_logp)``; with ``log_ratio_clamp`` the log-ratio is first clamped to
    +-that value (GRPO's guard); ``None`` keeps the plain SPEC section 8 formula.
    """
    log_ratio = logp - old_logp
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - eps, 1.0 + eps)
    return -torch.minimum(ratio * advantages, clipped_ratio * advantages), ratio


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *, eps: float = 0.2) -> torch.Tensor:
    """Scalar mean of -min(ratio*A, clip(ratio, 1-eps, 1+eps)*A), ratio = exp(logp - old_logp)."""
    return ppo_elementwise(logp, old_logp, advantages, eps=eps)[0].mean()


def ppo_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps: float = 0.2,
    log_ratio_clamp: float = 20.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-element PPO loss, ratio and clipped flag; the log-ratio is clamped so one stale
    sequence cannot overflow exp() (the seeds' KL blow-ups started as ratio overflows)."""
    loss, ratio = ppo_elementwise(logp, old_logp, advantages, eps=eps, log_ratio_clamp=log_ratio_clamp)
    clipped = (ratio < 1.0 - eps) | (ratio > 1.0 + eps)
    return loss, ratio, clipped


def rce_loss(seq_logp: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Reward-weighted CE: mean over groups of sum_b softmax_b(r_b / tau) * (-logp_b).

    ``seq_logp``, ``rewards``, ``mask``: [Q, G] padded per group (mask True = real candidate).
    Groups without any candidate are skipped.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    logits = (rewards / tau).masked_fill(~mask, float("-inf"))
    has = mask.any(-1)
    w = torch.softmax(logits[has], dim=-1)
    ce = (-seq_logp[has]).masked_fill(~mask[has], 0.0)
    if ce.numel() == 0:
        return seq_logp.sum() * 0.0
    return (w * ce).sum(-1).mean()
