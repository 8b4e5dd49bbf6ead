"""The nightly regression verdict (``lever regress``) and the gauges it pushes.

The rule, per shot (all numbers in accuracy *percentage points*):

* ``d = plan - baseline`` and ``[lo, hi]`` its confidence interval from the report (the
  summarizer's paired bootstrap at ``report.confidence``).
* rule ``strict`` (default): **regression iff hi < -margin**, i.e. even the most favourable end
  of the interval has the plan more than ``margin`` points behind the baseline.  This is a
  one-sided test of "worse by more than the margin" at (1 - confidence)/2: at 800 samples a
  per-shot CI is roughly +-2-3 points, so noise alone essentially never fails the nightly,
  while a real drop of ~4-5 points does.
* rule ``significant``: regression iff ``d < -margin`` and ``hi < 0`` (the point estimate is past
  the margin and the drop is statistically distinguishable from zero).  More sensitive, and with
  four shots it fails roughly one night in ten without any real change at 95 % confidence.
* A shot without a CI in the report falls back to ``d < -margin`` and says so.

Report keys relied on (``report.json`` of the summarize stage; read defensively).  The
summarizer's own format (``lever.report.build``)::

    {"units": "accuracy in percent ...", "baseline_plan": "baseline", "partial": false,
     "comparison": [{"shot": 1, "plan": 55.1, "baseline": 53.0, "diff": 2.1,
                     "paired": {"diff": 2.0, "low": -0.4, "high": 4.3, ...}}, ...]}

and, equivalently, the mapping form ``{"shots": {"1": {"plan", "baseline", "diff", "ci_low",
"ci_high"}}}``.  ``diff`` is recomputed from ``plan - baseline`` when missing.  The unit comes
from ``accuracy_unit`` / ``units`` when given ("ratio"/"percent"), else accuracies all within
0..1 are taken as ratios.  A partial report or a shot without both accuracies cannot be judged
(user error, exit 2): the nightly only calls ``regress`` after both plans finished.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

Rule = Literal["strict", "significant"]
RULES: tuple[str, ...] = ("strict", "significant")


class ReportFormatError(ValueError):
    """report.json lacks what the verdict needs (maps to CLI exit code 2)."""


@dataclass(frozen=True)
class ShotVerdict:
    shot: str
    plan: float  # points
    baseline: float  # points
    diff: float  # points
    ci_low: Optional[float]
    ci_high: Optional[float]
    regression: bool
    reason: str


@dataclass
class Verdict:
    plan: str
    baseline: str
    margin: float
    rule: str
    shots: list[ShotVerdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regression(self) -> bool:
        return any(s.regression for s in self.shots)

    def table(self) -> str:
        lines = [f"nightly regression check: {self.plan} vs {self.baseline}, margin {self.margin:g} points, rule {self.rule}",
                 f"{'shot':>4} {'plan':>7} {'base':>7} {'diff':>7} {'ci':>17}  verdict"]
        for s in self.shots:
            ci = f"[{s.ci_low:+.2f}, {s.ci_high:+.2f}]" if s.ci_low is not None and s.ci_high is not None else "n/a"
            lines.append(f"{s.shot:>4} {s.plan:7.2f} {s.baseline:7.2f} {s.diff:+7.2f} {ci:>17}  "
                         f"{'REGRESSION' if s.regression else 'ok'} ({s.reason})")
        lines += [f"note: {n}" for n in self.notes]
        lines.append("RESULT: " + ("REGRESSION" if self.regression else "ok"))
        return "\n".join(lines)


def _num(entry: Mapping[str, Any], key: str, where: str) -> Optional[float]:
    if key not in entry or entry[key] is None:
        return None
    try:
        v = float(entry[key])
    except (TypeError, ValueError):
        raise ReportFormatError(f"{where}.{key}: expected a number, got {entry[key]!r}") from None
    if not math.isfinite(v):
        raise ReportFormatError(f"{where}.{key}: not a finite number ({entry[key]!r})")
    return v


def _entries(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-shot ``{plan, baseline, diff, ci_low, ci_high}`` from either report form."""
    comp = report.get("comparison")
    if isinstance(comp, list):
        out = {}
        for i, c in enumerate(comp):
            if not isinstance(c, Mapping) or "shot" not in c:
                raise ReportFormatError(f"report.json: comparison[{i}] needs a 'shot'")
            paired = c.get("paired") if isinstance(c.get("paired"), Mapping) else {}
            out[str(c["shot"])] = {"plan": c.get("plan"), "baseline": c.get("baseline"), "diff": c.get("diff"),
                                   "ci_low": paired.get("low"), "ci_high": paired.get("high")}
        return out
    shots = report.get("shots")
    if isinstance(shots, Mapping):
        return {str(k): v for k, v in shots.items()}
    raise ReportFormatError("report.json: needs 'comparison' (a list per shot) or 'shots' as {shot: {...}}")


def _scale(report: Mapping[str, Any], shots: Mapping[str, Any]) -> float:
    """Multiplier from the report's accuracy unit to percentage points."""
    unit = str(report.get("accuracy_unit") or report.get("units") or "").lower()
    if unit.startswith(("ratio", "fraction")):
        return 100.0
    if unit.startswith(("percent", "points", "accuracy in percent")):
        return 1.0
    values = [abs(float(e[k])) for e in shots.values() if isinstance(e, Mapping)
              for k in ("plan", "baseline") if isinstance(e.get(k), (int, float))]
    return 100.0 if values and max(values) <= 1.0 else 1.0


def judge(report: Mapping[str, Any], *, plan: str, baseline: str, margin: float, rule: str = "strict") -> Verdict:
    """Apply the rule of the module docstring to every shot of ``report``."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r} ({' | '.join(RULES)})")
    if margin < 0:
        raise ValueError("margin must be >= 0 (accuracy points)")
    if not isinstance(report, Mapping):
        raise ReportFormatError("report.json: top level must be an object")
    shots = _entries(report)
    if not shots:
        raise ReportFormatError("report.json: no shots to compare")
    if report.get("partial") is True:
        missing = report.get("missing") or report.get("incomplete_cells") or []
        raise ReportFormatError(f"report.json is a partial report (missing: {missing}); cannot judge a regression")
    verdict = Verdict(plan, baseline, margin, rule)
    named = report.get("baseline_plan")
    if isinstance(named, str) and named != baseline:
        raise ReportFormatError(f"report.json compares against {named!r}, not the requested baseline {baseline!r}")
    k = _scale(report, shots)
    for shot in sorted(shots, key=lambda s: (len(str(s)), str(s))):
        entry = shots[shot]
        where = f"report.json: shot {shot}"
        if not isinstance(entry, Mapping):
            raise ReportFormatError(f"{where}: expected a mapping, got {type(entry).__name__}")
        p, b = _num(entry, "plan", where), _num(entry, "baseline", where)
        if p is None or b is None:
            raise ReportFormatError(f"{where}: needs both 'plan' and 'baseline' accuracies")
        d = _num(entry, "diff", where)
        d = (p - b) if d is None else d
        lo, hi = _num(entry, "ci_low", where), _num(entry, "ci_high", where)
        p, b, d = p * k, b * k, d * k
        lo = lo * k if lo is not None else None
        hi = hi * k if hi is not None else None
        if hi is None:
            reg = d < -margin
            reason = f"no CI in report; diff {d:+.2f} {'<' if reg else '>='} -{margin:g}"
            verdict.notes.append(f"shot {shot}: report has no confidence interval; judged on the point estimate")
        elif rule == "strict":
            reg = hi < -margin
            reason = f"CI upper bound {hi:+.2f} {'<' if reg else '>='} -{margin:g}"
        else:
            reg = d < -margin and hi < 0
            reason = f"diff {d:+.2f} vs -{margin:g}, CI upper bound {hi:+.2f} vs 0"
        verdict.shots.append(ShotVerdict(str(shot), p, b, d, lo, hi, reg, reason))
    return verdict


def push_gauges(verdict: Verdict, url: str, run_id: str, *, job: str = "lever", timeout: float = 10.0) -> None:
    """Push the per-shot gauges under the grouping key (plan, run_id, stage=regress), the same
    conventions the stage telemetry uses, so the alert's freshness join finds them.  Ratios (0..1)
    for accuracies and deltas, 1/0 for the regression flag per shot."""
    from prometheus_client import CollectorRegistry, Gauge
    from prometheus_client.exposition import push_to_gateway

    reg = CollectorRegistry()
    base = ("plan", "run_id", "stage")
    labels = {"plan": verdict.plan, "run_id": run_id, "stage": "regress"}
    g_flag = Gauge("lever_nightly_regression", "1 when this shot regressed beyond the margin (CI-based verdict).",
                   base + ("shot",), registry=reg)
    g_acc = Gauge("lever_nightly_accuracy", "Nightly plan accuracy (0..1) per shot.", base + ("shot",), registry=reg)
    g_base = Gauge("lever_nightly_baseline_accuracy", "Baseline plan accuracy (0..1) per shot.", base + ("shot",), registry=reg)
    g_delta = Gauge("lever_nightly_accuracy_delta", "Plan minus baseline accuracy (ratio) per shot.", base + ("shot",), registry=reg)
    g_hi = Gauge("lever_nightly_delta_ci_high", "Upper CI bound of plan minus baseline (ratio) per shot.",
                 base + ("shot",), registry=reg)
    g_push = Gauge("lever_last_push_timestamp_seconds", "Unix time of the last report.", base, registry=reg)
    for s in verdict.shots:
        lab = dict(labels, shot=s.shot)
        g_flag.labels(**lab).set(1 if s.regression else 0)
        g_acc.labels(**lab).set(s.plan / 100.0)
        g_base.labels(**lab).set(s.baseline / 100.0)
        g_delta.labels(**lab).set(s.diff / 100.0)
        if s.ci_high is not None:
            g_hi.labels(**lab).set(s.ci_high / 100.0)
    g_push.labels(**labels).set(time.time())
    push_to_gateway(url, job=job, registry=reg, grouping_key=labels, timeout=timeout)
