"""The tests behind the leaderboard: paired sign-flip permutation p-values and Holm's adjustment.

Why these: every member answers the same evaluation questions as the baseline, so the natural
unit is the per-question difference (pairing removes question difficulty, as the report's paired
bootstrap does).  Under "no difference" each per-question difference is as likely to have either
sign, so randomly flipping signs gives the null distribution of the summed difference without any
normality assumption -- VQA accuracies take only a few values per question.  Holm's step-down
procedure then keeps the family-wise error rate at alpha for any dependence between the tests
(members share the baseline, so their tests are correlated) and is uniformly more powerful than
Bonferroni.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lever.report.bootstrap import PairedCI, paired_bootstrap


def sign_flip_p(diffs: Sequence[float], *, permutations: int = 20000, seed: int = 0) -> float:
    """Two-sided Monte-Carlo p of a paired sign-flip test of ``sum(diffs) == 0``.

    ``(1 + #{|T*| >= |T|}) / (1 + permutations)``: never 0, so Holm never multiplies a zero
    (a p below the draws' resolution is reported as ~1/permutations)."""
    d = np.asarray(diffs, dtype=np.float64)
    d = d[d != 0.0]  # a zero difference is the same under either sign
    if d.size == 0:
        return 1.0
    observed = abs(d.sum())
    tol = 1e-9 * max(1.0, observed)
    rng = np.random.default_rng(seed)
    hits = 0
    chunk = max(1, 4_000_000 // d.size)
    for start in range(0, permutations, chunk):
        k = min(chunk, permutations - start)
        signs = rng.integers(0, 2, size=(k, d.size), dtype=np.int8) * 2 - 1
        hits += int((np.abs(signs @ d) >= observed - tol).sum())
    return (1 + hits) / (1 + permutations)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: sorted ascending, the i-th (0-based) of m is
    multiplied by (m - i), then made monotone with a running maximum and capped at 1."""
    p = [float(x) for x in pvalues]
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adj = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj


def simultaneous_ci(a: Sequence[float], b: Sequence[float], *, alpha: float, family: int, samples: int,
                    seed: int) -> PairedCI:
    """Paired bootstrap interval at confidence ``1 - alpha / family`` (Bonferroni): all ``family``
    intervals cover their true differences together with probability >= 1 - alpha, so an
    interval excluding 0 matches (conservatively) a significant Holm test."""
    return paired_bootstrap(a, b, samples=samples, confidence=1.0 - alpha / max(1, family), seed=seed)
