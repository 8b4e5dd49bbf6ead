"""The leaderboard's statistics against independent computations on fixed, constructed predictions.

Per-question differences of +-1 (the member right where the baseline is wrong, or the reverse, at
every shot) make the sign-flip test an exact two-sided sign test, whose p-value is a binomial
sum computed here with math.comb; Holm is recomputed by hand; the simultaneous interval of the
average is checked against the normal approximation at 1 - alpha/(2m) (statistics.NormalDist).
"""

from __future__ import annotations

import math
import random
from statistics import NormalDist, fmean, stdev

import pytest

from lever.campaign.leaderboard import MemberData, build_leaderboard
from lever.campaign.stats import holm, sign_flip_p

N = 400
SHOTS = [1, 2]


def _baseline(seed: int = 0) -> dict[int, dict[int, float]]:
    rng = random.Random(seed)
    row = {q: float(rng.random() < 0.5) for q in range(N)}
    return {k: dict(row) for k in SHOTS}


def _member(base: dict, plus: int, minus: int, offset: int = 0) -> dict[int, dict[int, float]]:
    """The baseline's answers, but right on ``plus`` questions it got wrong and wrong on ``minus``
    it got right (the same questions at every shot)."""
    row = dict(base[SHOTS[0]])
    wrong = [q for q in sorted(row) if row[q] == 0.0]
    right = [q for q in sorted(row) if row[q] == 1.0]
    wrong = wrong[offset:] + wrong[:offset]
    right = right[offset:] + right[:offset]
    for q in wrong[:plus]:
        row[q] = 1.0
    for q in right[:minus]:
        row[q] = 0.0
    return {k: dict(row) for k in SHOTS}


def exact_sign_p(plus: int, minus: int) -> float:
    n, t = plus + minus, abs(plus - minus)
    return sum(math.comb(n, k) for k in range(n + 1) if abs(2 * k - n) >= t) / 2 ** n


def hand_holm(p: list[float]) -> list[float]:
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, run = [0.0] * m, 0.0
    for r, i in enumerate(order):
        run = max(run, min(1.0, (m - r) * p[i]))
        out[i] = run
    return out


def test_holm_matches_the_textbook_example():
    # sorted p 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


@pytest.mark.parametrize("plus,minus", [(30, 14), (25, 20), (40, 10), (12, 12)])
def test_sign_flip_p_is_the_exact_sign_test_on_pm1_differences(plus, minus):
    d = [1.0] * plus + [-1.0] * minus + [0.0] * 100
    p = sign_flip_p(d, permutations=40000, seed=3)
    exact = exact_sign_p(plus, minus)
    assert abs(p - exact) < 0.006 + 0.03 * exact, (p, exact)


# ten members; "lucky" is better by chance alone (raw p ~0.02), "real" is better for real
NULLS = [(18, 18), (20, 16), (15, 19), (22, 21), (17, 20), (19, 15), (16, 16), (21, 23)]
LUCKY = (30, 14)
REAL = (70, 10)


def _members(with_real: bool) -> list[MemberData]:
    base = _baseline()
    spec = [(f"null{i}", p, mi) for i, (p, mi) in enumerate(NULLS)] + [("lucky", *LUCKY)]
    spec.append(("real", *REAL) if with_real else ("null8", 19, 19))
    return [MemberData(name, {None: (_member(base, p, mi, offset=3 * i), base)}) for i, (name, p, mi) in enumerate(spec)], spec


def test_a_member_better_by_chance_is_not_marked_best_after_adjustment():
    members, spec = _members(with_real=False)
    board = build_leaderboard(members, SHOTS, alpha=0.05, bootstrap_samples=1000, permutations=40000)
    rows = {r["name"]: r for r in board["rows"]}
    assert board["family_size"] == 10
    lucky = rows["lucky"]
    exact = exact_sign_p(*LUCKY)
    assert 0.005 < exact < 0.05  # significant alone, not after 10 comparisons
    assert lucky["p"] < 0.05 and lucky["diff"] == pytest.approx(100 * (LUCKY[0] - LUCKY[1]) / N)
    # the unadjusted comparison would have marked it; Holm does not
    assert board["unadjusted_best"] == "lucky"
    assert board["best"] is None and not any(r["best"] for r in board["rows"])
    assert lucky["p_holm"] >= 0.05 and not lucky["significant"]
    # Holm by hand on the reported raw p-values, and on the exact sign-test p-values
    names = [s[0] for s in spec]
    raw = [rows[n]["p"] for n in names]
    for n, adj in zip(names, hand_holm(raw)):
        assert rows[n]["p_holm"] == pytest.approx(adj, abs=6e-5)  # p are rounded to 1e-6
    exact_adj = hand_holm([exact_sign_p(p, mi) for _, p, mi in spec])
    for n, adj in zip(names, exact_adj):
        assert rows[n]["p_holm"] == pytest.approx(adj, abs=0.02 + 0.05 * adj)
    assert "no member is marked best" in _md(board).lower()


def test_a_real_improvement_is_marked_best_with_a_simultaneous_interval():
    members, spec = _members(with_real=True)
    alpha, m = 0.05, 10
    board = build_leaderboard(members, SHOTS, alpha=alpha, bootstrap_samples=1000, permutations=40000)
    rows = {r["name"]: r for r in board["rows"]}
    assert board["best"] == "real" and rows["real"]["best"] and rows["real"]["significant"]
    assert not rows["lucky"]["significant"]
    # independent interval: normal approximation of the mean per-question difference at 1 - alpha/(2m)
    z = NormalDist().inv_cdf(1 - alpha / (2 * m))
    for name, plus, minus in [s for s in spec if s[0] in ("real", "lucky")]:
        d = [1.0] * plus + [-1.0] * minus + [0.0] * (N - plus - minus)
        half = 100 * z * stdev(d) / math.sqrt(N)
        mean = 100 * fmean(d)
        r = rows[name]
        assert r["ci_low"] == pytest.approx(mean - half, abs=0.7), (name, r)
        assert r["ci_high"] == pytest.approx(mean + half, abs=0.7), (name, r)
        # per-shot interval is the plain 95% one: narrower than the simultaneous interval
        s = r["shots"]["1"]
        assert s["ci_high"] - s["ci_low"] < r["ci_high"] - r["ci_low"]
    assert rows["real"]["ci_low"] > 0 and rows["lucky"]["ci_low"] < 0


def test_seed_repeats_average_the_pairs_and_report_the_spread():
    base0, base1 = _baseline(0), _baseline(1)
    runs = {0: (_member(base0, 30, 10), base0), 1: (_member(base1, 10, 10), base1)}
    board = build_leaderboard([MemberData("m", runs)], SHOTS, permutations=2000, bootstrap_samples=500)
    (row,) = board["rows"]
    assert row["diff"] == pytest.approx(100 * ((30 - 10) / N + 0) / 2)
    diffs = [100 * 20 / N, 0.0]
    assert row["seed_spread"]["diff_sd"] == pytest.approx(stdev(diffs), abs=0.01)
    assert [p["seed"] for p in row["per_seed"]] == [0, 1]


def test_incomplete_members_are_listed_and_left_out_of_the_family():
    base = _baseline()
    ok = MemberData("ok", {None: (_member(base, 20, 10), base)})
    gone = MemberData("gone", {None: (None, base)}, missing=["gone: infer variantselector-shot1"])
    board = build_leaderboard([ok, gone], SHOTS, permutations=2000, bootstrap_samples=500)
    assert board["family_size"] == 1 and board["incomplete"] == ["gone"]


def _md(board: dict) -> str:
    from lever.campaign.report import render_markdown

    board = dict(board, campaign="t", baseline="baseline", seeds=None)
    return render_markdown(board)


def test_a_member_significantly_worse_is_a_regression_only_beyond_the_margin():
    base = _baseline()
    worse = MemberData("worse", {None: (_member(base, 5, 60), base)})  # -55 of 400: -13.75 points
    null = MemberData("null", {None: (_member(base, 10, 10), base)})
    board = build_leaderboard([worse, null], SHOTS, permutations=5000, bootstrap_samples=500, margin=5.0)
    assert board["regressions"] == ["worse"] and board["best"] is None
    board = build_leaderboard([worse, null], SHOTS, permutations=5000, bootstrap_samples=500, margin=20.0)
    assert board["regressions"] == []
