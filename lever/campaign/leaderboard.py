"""The leaderboard's numbers, from per-question accuracies (pure: no store, no files).

Rows are members, columns shots and their average.  Decisions (stated in every report):

* **Comparison**: each member against the baseline on the same questions, paired per question.
  With seeds, a question's value is its accuracy averaged over the seeds (member seed s is run
  against baseline seed s; both averaged), so seed noise shrinks the difference instead of being
  counted as questions.
* **Family**: one test per member on the *average over shots* -- the number a researcher ranks
  plans by.  Holm adjusts those p-values; "best" is marked only on this family.  The per-shot
  differences get plain (unadjusted) paired bootstrap intervals for reading the profile across
  shots, plus Holm-adjusted p-values over the larger members x shots family, shown as a marker.
* **Interval of the average**: paired bootstrap at 1 - alpha/m (Bonferroni over the m members),
  simultaneous for the whole table.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from lever.campaign.stats import holm, sign_flip_p, simultaneous_ci
from lever.report.bootstrap import paired_bootstrap

#: shot -> question_id -> VQA accuracy in [0, 1]
Arm = dict[int, dict[int, float]]

METHOD = ("two-sided paired sign-flip permutation test on the per-question difference of the "
          "average-over-shots accuracy (member minus baseline), Holm-adjusted over the members "
          "(family-wise error rate alpha); average intervals: paired bootstrap at 1 - alpha/m (Bonferroni, "
          "simultaneous); per-shot intervals: paired bootstrap, unadjusted, with a Holm-adjusted p over "
          "members x shots")


@dataclass
class MemberData:
    name: str
    runs: dict[Optional[int], tuple[Optional[Arm], Optional[Arm]]]  # seed -> (member, baseline); None = missing
    swept: tuple[tuple[str, Any], ...] = ()
    sweep: Optional[int] = None
    missing: list[str] = field(default_factory=list)


def _pct(x: float) -> float:
    return round(100.0 * x, 2)


def _paired(arms: list[tuple[Arm, Arm]], shots: Sequence[int]) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]],
                                                                        tuple[np.ndarray, np.ndarray]]:
    """Per shot and for the average: aligned (member, baseline) per-question values, each the
    mean over seeds; only questions every seed and shot evaluated."""
    per_shot: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    common_all: Optional[set[int]] = None
    for k in shots:
        qids = set.intersection(*[set(m[k]) & set(b[k]) for m, b in arms])
        common_all = qids if common_all is None else common_all & qids
        q = sorted(qids)
        a = np.array([[m[k][i] for i in q] for m, _ in arms]).mean(axis=0) if q else np.zeros(0)
        b = np.array([[bb[k][i] for i in q] for _, bb in arms]).mean(axis=0) if q else np.zeros(0)
        per_shot[k] = (a, b)
    q = sorted(common_all or ())
    a = np.array([[[m[k][i] for i in q] for k in shots] for m, _ in arms]).mean(axis=(0, 1)) if q else np.zeros(0)
    b = np.array([[[bb[k][i] for i in q] for k in shots] for _, bb in arms]).mean(axis=(0, 1)) if q else np.zeros(0)
    return per_shot, (a, b)


def _arm_average(arm: Arm, shots: Sequence[int]) -> float:
    return statistics.fmean(statistics.fmean(arm[k].values()) for k in shots)


def _spread(values: list[float]) -> Optional[float]:
    return round(statistics.stdev(values), 2) if len(values) >= 2 else None


def build_leaderboard(members: Sequence[MemberData], shots: Sequence[int], *, alpha: float = 0.05,
                      confidence: float = 0.95, bootstrap_samples: int = 2000, permutations: int = 20000,
                      margin: float = 0.0, seed: int = 0) -> dict:
    shots = list(shots)
    rows: list[dict] = []
    complete: list[int] = []
    for i, m in enumerate(members):
        row: dict[str, Any] = {"name": m.name, "swept": {k: v for k, v in m.swept}, "sweep": m.sweep,
                               "seeds": [s for s in m.runs], "missing": list(m.missing)}
        arms = [(a, b) for a, b in m.runs.values() if a is not None and b is not None]
        if m.missing or len(arms) != len(m.runs) or not arms:
            row["complete"] = False
            rows.append(row)
            continue
        row["complete"] = True
        per_shot, (avg_a, avg_b) = _paired(arms, shots)
        row["n"] = int(avg_a.size)
        row["accuracy"] = {str(k): _pct(float(a.mean())) if a.size else None for k, (a, _) in per_shot.items()}
        row["baseline"] = {str(k): _pct(float(b.mean())) if b.size else None for k, (_, b) in per_shot.items()}
        row["average"] = _pct(float(avg_a.mean())) if avg_a.size else None
        row["baseline_average"] = _pct(float(avg_b.mean())) if avg_b.size else None
        row["shots"] = {}
        for k, (a, b) in per_shot.items():
            ci = paired_bootstrap(a, b, samples=bootstrap_samples, confidence=confidence, seed=seed)
            row["shots"][str(k)] = {"diff": round(100 * ci.diff, 2), "ci_low": round(100 * ci.low, 2),
                                    "ci_high": round(100 * ci.high, 2), "n": ci.n,
                                    "p": sign_flip_p(a - b, permutations=permutations, seed=seed)}
        row["p"] = sign_flip_p(avg_a - avg_b, permutations=permutations, seed=seed)
        row["_avg"] = (avg_a, avg_b)
        seeds = [s for s in m.runs]
        if len(seeds) >= 2:
            accs = [_arm_average(a, shots) * 100 for a, _ in arms]
            diffs = [(_arm_average(a, shots) - _arm_average(b, shots)) * 100 for a, b in arms]
            row["per_seed"] = [{"seed": s, "average": round(x, 2), "diff": round(d, 2)}
                               for s, x, d in zip(seeds, accs, diffs)]
            row["seed_spread"] = {"average_sd": _spread(accs), "diff_sd": _spread(diffs)}
        complete.append(i)
        rows.append(row)

    m = len(complete)
    adj = holm([rows[i]["p"] for i in complete])
    cells = [(i, str(k)) for i in complete for k in shots]
    adj_cells = holm([rows[i]["shots"][k]["p"] for i, k in cells])
    samples = min(20000, max(bootstrap_samples, int(math.ceil(40 * m / alpha))))
    for (i, k), p in zip(cells, adj_cells):
        rows[i]["shots"][k]["p_holm"] = round(p, 6)
        rows[i]["shots"][k]["significant"] = p < alpha
    for i, p in zip(complete, adj):
        row = rows[i]
        a, b = row.pop("_avg")
        ci = simultaneous_ci(a, b, alpha=alpha, family=m, samples=samples, seed=seed)
        row["diff"] = round(100 * ci.diff, 2)
        row["ci_low"], row["ci_high"] = round(100 * ci.low, 2), round(100 * ci.high, 2)
        row["p"] = round(row["p"], 6)
        row["p_holm"] = round(p, 6)
        row["significant"] = p < alpha
        row["better"] = p < alpha and ci.diff > 0
        row["worse"] = p < alpha and 100 * ci.diff < -margin
    better = [rows[i] for i in complete if rows[i]["better"]]
    naive = [rows[i] for i in complete if rows[i]["p"] < alpha and rows[i]["diff"] > 0]
    best = max(better, key=lambda r: r["diff"])["name"] if better else None
    naive_best = max(naive, key=lambda r: r["diff"])["name"] if naive else None
    top = max((rows[i] for i in complete), key=lambda r: r["average"], default=None)
    for r in rows:
        r["best"] = r["name"] == best
    return {
        "shots": shots, "alpha": alpha, "confidence": confidence, "family_size": m,
        "family_size_shots": len(cells), "bootstrap_samples": bootstrap_samples,
        "simultaneous_bootstrap_samples": samples, "permutations": permutations, "margin": margin,
        "method": METHOD, "rows": rows, "best": best, "unadjusted_best": naive_best,
        "highest_average": top["name"] if top else None,
        "regressions": [r["name"] for r in rows if r.get("worse")],
        "incomplete": [r["name"] for r in rows if not r["complete"]],
    }
