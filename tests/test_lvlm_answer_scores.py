"""The answer-score formulas (lever.models.answer_scores) against hand-worked numbers, no model.

The same formulas on the tiny Qwen2.5-VL are covered by test_lvlm_scoring.py (answer masking,
gt_prob on a real model) and test_beams_infoscore.py / test_rldata_generation.py (their users).
"""

from __future__ import annotations

import math

import pytest
import torch

from lever.models.answer_scores import (
    answer_prob,
    geometric_mean_prob,
    gt_prob,
    gt_prob_batch,
    infoscore_gain,
    mean_token_logprob,
    token_f1,
    weighted_gt_prob,
)
from lever.models.prompting import Example


class _KnownLogprobs:
    """An LVLM whose mean answer log-prob is looked up by answer text: the formulas on top of
    ``answer_logprob`` are then checkable by hand."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table
        self.asked: list[str] = []

    def answer_logprob(self, prompts, answers):
        self.asked.extend(answers)
        return [self.table[a] for a in answers]


def test_answer_probability_is_the_geometric_mean_of_token_probabilities():
    token_lp = torch.log(torch.tensor([0.5, 0.125]))  # geometric mean sqrt(0.5 * 0.125) = 0.25
    lp = mean_token_logprob(token_lp)
    assert lp == pytest.approx(math.log(0.25))
    assert geometric_mean_prob(lp) == pytest.approx(0.25)
    lvlm = _KnownLogprobs({"red": math.log(0.25), "blue": 0.0})
    q = Example(image="x.png", question="colour?")
    assert answer_prob(lvlm, [[q], [q]], ["red", "blue"]) == pytest.approx([0.25, 1.0])


def test_infoscore_gain_is_the_probability_difference_and_telescopes():
    assert infoscore_gain(0.5, 0.125) == pytest.approx(0.375)
    assert infoscore_gain(0.1, 0.4) == pytest.approx(-0.3)
    p0, p1, p2 = 0.2, 0.35, 0.3  # P(y|x), P(y|c1,x), P(y|c1,c2,x)
    assert infoscore_gain(p1, p0) + infoscore_gain(p2, p1) == pytest.approx(p2 - p0)


def test_gt_prob_groups_normalized_answers_and_weights_by_annotator_counts():
    # 10 annotators: "Two"/"2."/"two" normalize to "2" (5 votes), "three" -> "3" (3), "dog" (2)
    gts = ["Two", "2.", "two", "2", "two", "three", "3", "Three", "dog", "dog"]
    lvlm = _KnownLogprobs({"2": math.log(0.5), "3": math.log(0.25), "dog": math.log(0.125)})
    q = Example(image="x.png", question="how many?")
    per = gt_prob_batch(lvlm, [[q]], [gts])[0]
    assert per == pytest.approx({"2": 0.5, "3": 0.25, "dog": 0.125})
    assert lvlm.asked == ["2", "3", "dog"]  # one scoring per distinct normalized answer
    expected = 0.5 * 0.5 + 0.3 * 0.25 + 0.2 * 0.125  # 0.35
    assert weighted_gt_prob(per, gts) == pytest.approx(expected)
    assert gt_prob(lvlm, [q], gts) == pytest.approx(expected)


def test_token_f1_hand_worked():
    assert token_f1(["red", "car"], ["red"]) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert token_f1(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx(2 / 3)  # common: a, b
    assert token_f1([], []) == 1.0
    assert token_f1([], ["red"]) == 0.0
    assert token_f1(["green"], ["red"]) == 0.0
