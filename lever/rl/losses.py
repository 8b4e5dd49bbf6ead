"""Loss pieces shared by RCE and GRPO (SPEC sections 4 and 8).

Public: :func:`kl_k3`, :func:`ppo_clip_loss`.  The rest are the masked/padded forms the trainers
use, kept here so that the formulas live in one tested place.
"""

from __future__ import annotations

import torch

from lever.selectors.pointer import entropy, exact_kl  # re-exported: exact KL over candidate distributions

__all__ = ["kl_k3", "ppo_clip_loss", "ppo_terms", "rce_loss", "exact_kl", "entropy"]


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Elementwise k3 estimator of KL(policy || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *, eps: float = 0.2) -> torch.Tensor:
    """Scalar mean of -min(ratio*A, clip(ratio, 1-eps, 1+eps)*A), ratio = exp(logp - old_logp)."""
    ratio = torch.exp(logp - old_logp)
    return -torch.minimum(ratio * advantages, ratio.clamp(1.0 - eps, 1.0 + eps) * advantages).mean()


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
    log_ratio = (logp - old_logp).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - eps, 1.0 + eps)
    loss = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
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
