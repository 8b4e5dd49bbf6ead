"""plan9's quality buckets (the seeds' curriculum): by reward gap and counts of outcomes.

high:   gap >= high_gap   and >= high_min_each positives and negatives
medium: gap >= medium_gap and >= medium_min_each positives and negatives (and not high)
low:    everything else (incl. groups with only one outcome)
gap = max reward - min reward in the group; positive = ``correct``.
"""

from __future__ import annotations

from collections import Counter

import torch

from lever.config.schema import CurriculumConfig
from lever.rl.groups import GroupData

BUCKETS: tuple[str, ...] = ("high", "medium", "low")


def quality_buckets(data: GroupData, cfg: CurriculumConfig) -> list[str]:
    """Bucket name per query of ``data`` (CurriculumConfig thresholds)."""
    gm = data.group_mask
    r = data.rewards
    gap = (r.masked_fill(~gm, float("-inf")).max(-1).values - r.masked_fill(~gm, float("inf")).min(-1).values)
    pos = (data.correct & gm).sum(-1)
    neg = (~data.correct & gm).sum(-1)
    out = []
    for g, p, n in zip(gap.tolist(), pos.tolist(), neg.tolist()):
        if g >= cfg.high_gap and p >= cfg.high_min_each and n >= cfg.high_min_each:
            out.append("high")
        elif g >= cfg.medium_gap and p >= cfg.medium_min_each and n >= cfg.medium_min_each:
            out.append("medium")
        else:
            out.append("low")
    return out


def bucket_counts(buckets: list[str]) -> dict[str, int]:
    c = Counter(buckets)
    return {b: c.get(b, 0) for b in BUCKETS}


def phase1_indices(data: GroupData, cfg: CurriculumConfig) -> torch.Tensor:
    """Queries of the high and medium buckets (phase 1 of the curriculum)."""
    return torch.tensor([i for i, b in enumerate(quality_buckets(data, cfg)) if b != "low"], dtype=torch.long)


def positive_indices(data: GroupData) -> torch.Tensor:
    """Queries whose group holds at least one correct candidate (``grpo.require_positive``)."""
    return (data.correct & data.group_mask).any(-1).nonzero(as_tuple=True)[0]
