"""Reward modes against hand-worked values (SPEC section 4)."""

from __future__ import annotations

import math

import pytest

from lever.rl.rewards import compute_reward

POS = {"correct": True, "acc_score": 0.6, "gt_prob": 0.4, "rel_score": 0.9, "beam_score": 2.0}
NEG = {"correct": False, "acc_score": 0.3, "gt_prob": 0.1, "rel_score": 0.5, "beam_score": -1.0}


@pytest.mark.parametrize(
    "mode, cand, kwargs, expected",
    [
        ("hard_plus_soft", POS, {}, 1.6),
        ("hard_plus_soft", NEG, {}, 0.3),
        ("hard_plus_soft", POS, {"hard_weight": 2.0, "soft_weight": 0.5}, 2.3),
        ("separated", POS, {}, 2.6),
        ("separated", NEG, {}, 0.3),
        ("separated", POS, {"hard_weight": 0.5, "soft_weight": 2.0}, 2.2),
        # hw*correct + sw*gt_prob + rel_w*(1-correct)*rel
        ("hard_plus_gtprob_plus_rel", POS, {"soft_weight": 0.5, "rel_weight": 0.2}, 1.2),
        ("hard_plus_gtprob_plus_rel", NEG, {"soft_weight": 0.5, "rel_weight": 0.2}, 0.05 + 0.1),
        ("hard_plus_gtprob_plus_rel", NEG, {}, 0.1 + 0.05),
        # alpha*beam_score + beta*correct
        ("legacy", POS, {}, 0.5 * 2.0 + 0.8),
        ("legacy", NEG, {"alpha": 1.0, "beta": 3.0}, -1.0),
    ],
)
def test_modes_match_hand_worked_values(mode, cand, kwargs, expected):
    assert compute_reward(dict(cand), mode, **kwargs) == pytest.approx(expected, abs=1e-12)


def test_result_is_clipped_to_plus_minus_five():
    assert compute_reward({**POS, "beam_score": 40.0}, "legacy") == 5.0
    assert compute_reward({**NEG, "beam_score": -40.0}, "legacy") == -5.0


def test_unknown_mode_names_the_allowed_ones():
    with pytest.raises(ValueError, match="hard_plus_soft, separated, hard_plus_gtprob_plus_rel, legacy"):
        compute_reward(dict(POS), "hard+soft")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_is_rejected(bad):
    with pytest.raises(ValueError, match="acc_score"):
        compute_reward({**POS, "acc_score": bad}, "hard_plus_soft")
    # a field the mode does not read does not matter
    assert compute_reward({**POS, "beam_score": bad}, "hard_plus_soft") == pytest.approx(1.6)


def test_missing_field_is_named():
    with pytest.raises(ValueError, match="gt_prob"):
        compute_reward({"correct": True, "rel_score": 0.1}, "hard_plus_gtprob_plus_rel")
