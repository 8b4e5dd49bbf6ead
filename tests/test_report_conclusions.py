"""What a report says it can and cannot conclude: detectable difference, identical-ICD lines,
comparisons against the reference rows (hand-worked and recomputed independently)."""

from __future__ import annotations

import math

import pytest

from lever.report.bootstrap import paired_bootstrap
from lever.report.build import conclusions, detectable_difference, reference_comparison
from lever.report.predictions import Cell
from lever.report.render import render_markdown


def _cell(variant: str, shot: int, accs: list[float], icds: list[list[int]] | None = None) -> Cell:
    c = Cell(variant, shot, shards=1, shards_expected=1)
    for q, a in enumerate(accs):
        c.rows[q] = {"question_id": q, "accuracy": a, "icd_ids": (icds or [[q]] * len(accs))[q]}
    return c


def test_detectable_difference_hand_worked():
    # plan 4 of 8 right, baseline 2 of 8, on the same questions: per-question differences (points)
    # are [0, 0, 100, 100, 0, 0, 0, 0], mean 25, sample variance (2*75^2 + 6*25^2)/7
    a = _cell("selector", 1, [1, 1, 1, 1, 0, 0, 0, 0])
    b = _cell("selector", 1, [1, 1, 0, 0, 0, 0, 0, 0])
    var_d = (2 * 75 ** 2 + 6 * 25 ** 2) / 7
    z = 1.959963984540054 + 0.8416212335729143  # 95% two-sided + 80% power
    want = z * math.sqrt(var_d) / math.sqrt(8)
    assert detectable_difference(a, b, 0.95) == pytest.approx(want, rel=1e-9)
    # the pairing matters: the same two rows with the baseline's right answers on other questions
    # differ on 6 questions instead of 2, and need a larger difference to be resolved
    b_shuffled = _cell("selector", 1, [0, 0, 0, 0, 0, 0, 1, 1])
    assert detectable_difference(a, b_shuffled, 0.95) > 1.5 * want
    # more questions, same spread: it shrinks as 1/sqrt(n)
    a4 = _cell("selector", 1, [1, 1, 1, 1, 0, 0, 0, 0] * 4)
    b4 = _cell("selector", 1, [1, 1, 0, 0, 0, 0, 0, 0] * 4)
    assert detectable_difference(a4, b4, 0.95) < want / 1.9
    # rows that never differ: nothing to resolve
    assert detectable_difference(a, a, 0.95) is None


def test_identical_icds_are_named_and_widths_reported():
    icds = [[q, q + 1] for q in range(6)]
    plan = {2: _cell("selector", 2, [1, 0, 1, 0, 1, 1], icds)}
    base = {2: _cell("selector", 2, [1, 0, 1, 0, 1, 1], icds)}
    comparison = [{"shot": 2, "paired": paired_bootstrap([1, 0, 1, 0, 1, 1], [1, 0, 1, 0, 1, 1], samples=200).as_dict(100)}]
    overlap = {"2": {"n": 6, "identical_sequence_share": 1.0}}
    con = conclusions(comparison, overlap, {"plan": plan, "baseline": base}, [2], 0.95)
    assert con["identical_icds_shots"] == [2]
    assert con["per_shot"][0]["n"] == 6 and con["per_shot"][0]["ci_width"] == 0.0
    # one different sequence: no longer identical
    overlap["2"]["identical_sequence_share"] = 0.8333
    assert conclusions(comparison, overlap, {"plan": plan, "baseline": base}, [2], 0.95)["identical_icds_shots"] == []


def test_reference_comparison_matches_an_independent_bootstrap():
    accs = {"plan": [1, 1, 0, 1, 0, 1, 1, 0, 1, 1], "baseline": [1, 0, 0, 1, 0, 1, 0, 0, 1, 1],
            "random": [0, 0, 0, 1, 0, 0, 0, 0, 1, 0], "oracle": [1, 1, 1, 1, 1, 1, 1, 0, 1, 1]}
    rows = {name: {1: _cell(name, 1, a)} for name, a in accs.items()}
    out = reference_comparison(rows, ["random", "oracle"], [1], samples=500, conf=0.95, seed=3)
    for name in ("plan", "baseline"):
        for ref in ("random", "oracle"):
            got = out[name][ref][0]["paired"]
            want = paired_bootstrap(accs[name], accs[ref], samples=500, confidence=0.95, seed=3 * 1000 + 1).as_dict(100.0)
            assert got == want
    assert out["plan"]["random"][0]["paired"]["diff"] == pytest.approx(50.0)
    assert out["plan"]["random"][0]["paired"]["significant"]


def test_markdown_states_the_conclusions():
    rep = {
        "plan": "p", "baseline_plan": "b", "description": "", "partial": False, "missing": [], "incomplete_cells": [],
        "shots": [1], "accuracy": {"plan": {"1": 50.0}, "baseline": {"1": 50.0}}, "n": {"plan": {"1": 10}},
        "comparison": [{"shot": 1, "diff": 0.0, "paired": {"low": 0.0, "high": 0.0, "significant": False, "n": 10}}],
        "average": {"plan": 50.0, "baseline": 50.0}, "average_diff": 0.0, "shots_improved": 0, "shots_compared": 1,
        "regression": {"available": False, "reason": "x"}, "checkpoint": None, "epoch_checkpoints": {},
        "training": {}, "icd_overlap": {}, "reward_data": None,
        "failed_evaluations": {"predictions": {}, "rl_data": None},
        "bootstrap": {"samples": 100, "confidence": 0.95},
        "conclusions": {"power": 0.8, "per_shot": [{"shot": 1, "n": 10, "ci_width": 0.0, "detectable_difference": 12.5}],
                        "identical_icds_shots": [1]},
        "reference_comparison": {"baseline": {"random": [{"shot": 1, "paired": {"diff": 20.0, "low": 5.0, "high": 35.0,
                                                                                "significant": True}}]}},
    }
    md = render_markdown(rep, [])
    assert "## What this report can conclude" in md and "| 1 | 10 | 0.00 | 12.50 |" in md
    assert "identical ICD sequences" in md
    assert "| baseline − random | +20.00 [+5.00, +35.00] * |" in md
