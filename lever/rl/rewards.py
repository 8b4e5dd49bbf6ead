"""Per-candidate rewards (SPEC section 4).

Kept as one pure function of the candidate's LVLM verdict so that the trainers, the report's
reward diagnostics and external checks all score a candidate the same way.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from lever.config.schema import RewardConfig

REWARD_MODES: tuple[str, ...] = ("hard_plus_soft", "separated", "hard_plus_gtprob_plus_rel", "legacy")
REWARD_CLIP = 5.0

#: candidate fields each mode reads
_FIELDS: dict[str, tuple[str, ...]] = {
    "hard_plus_soft": ("correct", "acc_score"),
    "separated": ("correct", "acc_score"),
    "hard_plus_gtprob_plus_rel": ("correct", "gt_prob", "rel_score"),
    "legacy": ("correct", "beam_score"),
}


def _number(record: Mapping[str, Any], field: str) -> float:
    if field not in record:
        raise ValueError(f"reward needs field {field!r}, missing from the candidate")
    v = record[field]
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if not isinstance(v, (int, float)):
        raise ValueError(f"field {field!r} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"field {field!r} is not finite ({v})")
    return v


def compute_reward(
    record: dict,
    mode: str,
    *,
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
    rel_weight: float = 0.1,
    alpha: float = 0.5,
    beta: float = 0.8,
) -> float:
    """Reward of one candidate sequence, clipped to [-5, 5].

    * hard_plus_soft: hw*correct + sw*acc_score
    * separated: correct ? 2*hw + sw*acc_score : sw*acc_score
    * hard_plus_gtprob_plus_rel: hw*correct + sw*gt_prob + rel_w*(1-correct)*rel_score
    * legacy: alpha*beam_score + beta*correct
    """
    if mode not in _FIELDS:
        raise ValueError(f"unknown reward mode {mode!r}; allowed: {', '.join(REWARD_MODES)}")
    for w_name, w in (("hard_weight", hard_weight), ("soft_weight", soft_weight), ("rel_weight", rel_weight),
                      ("alpha", alpha), ("beta", beta)):
        if not math.isfinite(float(w)):
            raise ValueError(f"{w_name} is not finite ({w})")
    f = {name: _number(record, name) for name in _FIELDS[mode]}
    c = f["correct"]
    if mode == "hard_plus_soft":
        r = hard_weight * c + soft_weight * f["acc_score"]
    elif mode == "separated":
        r = (2.0 * hard_weight if c > 0 else 0.0) + soft_weight * f["acc_score"]
    elif mode == "hard_plus_gtprob_plus_rel":
        r = hard_weight * c + soft_weight * f["gt_prob"] + rel_weight * (1.0 - c) * f["rel_score"]
    else:
        r = alpha * f["beam_score"] + beta * c
    return max(-REWARD_CLIP, min(REWARD_CLIP, r))


def plan_reward(record: dict, cfg: RewardConfig) -> float:
    """The reward a plan trains on: ``compute_reward`` with the ``RewardConfig``'s mode and weights,
    sign-flipped under the ``negate`` ablation (a deliberately harmful signal that an evaluation
    able to tell a working selector from a broken one must catch)."""
    r = compute_reward(record, cfg.mode, **reward_kwargs(cfg))
    return -r if cfg.negate else r


def reward_kwargs(cfg: RewardConfig) -> dict[str, float]:
    """Keyword weights from a ``RewardConfig`` (so callers need not list them)."""
    return {
        "hard_weight": cfg.hard_weight,
        "soft_weight": cfg.soft_weight,
        "rel_weight": cfg.rel_weight,
        "alpha": cfg.alpha,
        "beta": cfg.beta,
    }
