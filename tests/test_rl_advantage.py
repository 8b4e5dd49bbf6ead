"""group_advantages equals a per-group Python loop for any group sizes and order."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lever.rl.advantage import group_advantages


def _loop(rewards: list[float], gids: list[int], mode: str, min_std: float, clip: float) -> list[float]:
    out = [0.0] * len(rewards)
    for g in set(gids):
        idx = [i for i, x in enumerate(gids) if x == g]
        r = [rewards[i] for i in idx]
        n = len(r)
        if n < 2 or max(r) == min(r):
            continue
        if mode == "zscore":
            m = sum(r) / n
            std = math.sqrt(sum((x - m) ** 2 for x in r) / (n - 1))
            vals = [(x - m) / max(std, min_std) for x in r]
        else:
            vals = []
            for x in r:
                greater = sum(1 for y in r if y > x)
                equal = sum(1 for y in r if y == x)
                rank = greater + (equal - 1) / 2.0  # average of the tied 0-based ranks
                vals.append(1.0 - 2.0 * rank / (n - 1))
        for i, v in zip(idx, vals):
            out[i] = max(-clip, min(clip, v))
    return out


@pytest.mark.parametrize("mode", ["zscore", "rank"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorized_equals_per_group_loop_sizes_1_to_40_shuffled(mode, seed):
    rng = random.Random(seed)
    rewards, gids = [], []
    for g in range(1, 41):  # group g has g members; some groups tied, some constant
        kind = rng.random()
        for _ in range(g):
            if kind < 0.15:
                rewards.append(1.0)
            elif kind < 0.5:
                rewards.append(rng.choice([0.0, 0.3, 1.0, 1.3, 2.0]))  # many ties
            else:
                rewards.append(rng.uniform(-3, 3) * (0.01 if kind > 0.9 else 1.0))  # some tiny-variance groups
            gids.append(g * 7 + 3)  # non-contiguous ids
    order = list(range(len(rewards)))
    rng.shuffle(order)
    r = [rewards[i] for i in order]
    g = [gids[i] for i in order]
    got = group_advantages(torch.tensor(r, dtype=torch.float32), torch.tensor(g), mode=mode, min_std=0.1, clip=2.5)
    ref = _loop([float(torch.tensor(x, dtype=torch.float32)) for x in r], g, mode, 0.1, 2.5)
    assert got.shape == (len(r),)
    assert torch.allclose(got.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-6)


def test_hand_worked_small_groups():
    r = torch.tensor([2.0, 1.0, 1.0, 0.0, 5.0, 3.0, 3.0])
    g = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    rank = group_advantages(r, g, mode="rank")
    # group 0 ranks: 2.0 -> 0, the two 1.0 share (1+2)/2 = 1.5, 0.0 -> 3; n-1 = 3
    assert rank.tolist() == pytest.approx([1.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0])
    z = group_advantages(r, g, mode="zscore", min_std=0.1)
    std = math.sqrt(2.0 / 3.0)  # deviations 1, 0, 0, -1 -> sum sq 2, Bessel n-1 = 3
    assert z.tolist() == pytest.approx([1 / std, 0.0, 0.0, -1 / std, 0.0, 0.0, 0.0], abs=1e-6)


def test_min_std_floor_and_clip():
    r = torch.tensor([0.0, 0.01])
    z = group_advantages(r, torch.tensor([0, 0]), mode="zscore", min_std=0.1)
    # std = 0.00707 < 0.1 -> floored: (+-0.005)/0.1
    assert z.tolist() == pytest.approx([-0.05, 0.05], abs=1e-6)
    big = group_advantages(torch.tensor([0.0] * 30 + [10.0]), torch.zeros(31, dtype=torch.long), clip=2.0)
    assert float(big.max()) == 2.0


def test_non_finite_rewards_raise():
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
