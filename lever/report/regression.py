"""The one regression verdict: ``lever regress`` (nightly), the report's ``regression`` section
and, through the gauges ``lever regress`` pushes, the ``LeverNightlyRegression`` alert.

Why one module: the three used to judge differently (CI-based here, a point estimate in the
report, a point-estimate clause in the alert), so a nightly could pass while its own report said
REGRESSION.  Now the summarizer calls :func:`judge` on the comparison it writes (so report.json and
``lever regress`` on that file always agree), and the alert only reads the flag :func:`push_gauges`
exports.  The rule comes from ``AlertConfig.regression_rule`` (default ``strict``), the margin from
``AlertConfig.regression_margin``.

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
(user error, exit 2): the nightly only calls ``regress`` after both plans finished; the report
itself then says the verdict is not available (:func:`report_section`).  A report written by a
newer Lever (``schema_version`` above what this one reads) is refused before any field is read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, get_args

from lever.config.schema import RegressionRule
from lever.versioning import upgrade

Rule = RegressionRule
RULES: tuple[str, ...] = get_args(RegressionRule)


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

    def reason(self) -> str:
        """One line: the regressed shots and why, or why none did."""
        bad = [s for s in self.shots if s.regression]
        if bad:
            return "; ".join(f"shot {s.shot}: {s.reason}" for s in bad)
        return f"no shot regressed (rule {self.rule}, margin {self.margin:g} points)"

    def as_dict(self) -> dict[str, Any]:
        """The report's ``regression`` section (also what ``lever regress`` decides on)."""
        return {
            "available": True,
            "rule": self.rule,
            "margin_points": self.margin,
            "detected": self.regression,
            "reason": self.reason(),
            "shots": [{"shot": s.shot, "plan": _rnd(s.plan), "baseline": _rnd(s.baseline), "diff": _rnd(s.diff),
                       "ci_low": _rnd(s.ci_low), "ci_high": _rnd(s.ci_high), "regression": s.regression,
                       "reason": s.reason} for s in self.shots],
            "notes": list(self.notes),
        }

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


def _rnd(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 4)


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
    report = upgrade(dict(report), "report", "report.json")  # refuses a newer Lever's report
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


def report_section(report: Mapping[str, Any], *, plan: str, baseline: Optional[str], margin: float,
                   rule: str = "strict") -> dict[str, Any]:
    """The report's ``regression`` section: :func:`judge` on the report's own comparison, or, when
    the report cannot be judged (no baseline plan, partial report, a shot without accuracies),
    ``available: false`` with the reason instead of an exception -- a partial report must still
    be written."""
    def unavailable(why: str) -> dict[str, Any]:
        return {"available": False, "rule": rule, "margin_points": margin, "detected": False,
                "reason": f"verdict not available: {why}", "shots": [], "notes": []}

    if baseline is None:
        return unavailable("the plan has no baseline plan to compare with")
    if report.get("partial") is True:
        missing = list(report.get("missing") or []) + list(report.get("incomplete_cells") or [])
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        return unavailable(f"partial report (missing: {shown or 'inputs'})")
    try:
        return judge(report, plan=plan, baseline=baseline, margin=margin, rule=rule).as_dict()
    except ValueError as exc:  # ReportFormatError, or a negative alerts.regression_margin
        return unavailable(str(exc))


#: gauges :func:`push_gauges` exports (the only producer of ``lever_nightly_*``)
NIGHTLY_GAUGES: tuple[tuple[str, str], ...] = (
    ("lever_nightly_regression", "1 when this shot regressed beyond the margin (CI-based verdict)."),
    ("lever_nightly_accuracy", "Nightly plan accuracy (0..1) per shot."),
    ("lever_nightly_baseline_accuracy", "Baseline plan accuracy (0..1) per shot."),
    ("lever_nightly_accuracy_delta", "Plan minus baseline accuracy (ratio) per shot."),
    ("lever_nightly_delta_ci_high", "Upper CI bound of plan minus baseline (ratio) per shot."),
)


def gauge_registry(verdict: Verdict, run_id: str) -> tuple[Any, dict[str, str]]:
    """The registry :func:`push_gauges` pushes and its grouping key (plan, run_id, stage=regress),
    the same conventions the stage telemetry uses, so the alert's freshness join finds them.
    Ratios (0..1) for accuracies and deltas, 1/0 for the regression flag per shot."""
    from prometheus_client import CollectorRegistry, Gauge

    reg = CollectorRegistry()
    base = ("plan", "run_id", "stage")
    labels = {"plan": verdict.plan, "run_id": run_id, "stage": "regress"}
    g = {name: Gauge(name, doc, base + ("shot",), registry=reg) for name, doc in NIGHTLY_GAUGES}
    g_push = Gauge("lever_last_push_timestamp_seconds", "Unix time of the last report.", base, registry=reg)
    for s in verdict.shots:
        lab = dict(labels, shot=s.shot)
        g["lever_nightly_regression"].labels(**lab).set(1 if s.regression else 0)
        g["lever_nightly_accuracy"].labels(**lab).set(s.plan / 100.0)
        g["lever_nightly_baseline_accuracy"].labels(**lab).set(s.baseline / 100.0)
        g["lever_nightly_accuracy_delta"].labels(**lab).set(s.diff / 100.0)
        if s.ci_high is not None:
            g["lever_nightly_delta_ci_high"].labels(**lab).set(s.ci_high / 100.0)
    g_push.labels(**labels).set(time.time())
    return reg, labels


def push_gauges(verdict: Verdict, url: str, run_id: str, *, job: str = "lever", timeout: float = 10.0) -> None:
    """Push :func:`gauge_registry` to the Pushgateway (replaces the run's ``regress`` group)."""
    from prometheus_client.exposition import push_to_gateway

    reg, labels = gauge_registry(verdict, run_id)
    push_to_gateway(url, job=job, registry=reg, grouping_key=labels, timeout=timeout)


def exported_metric_names() -> frozenset[str]:
    """Metric names :func:`push_gauges` really exports (for the dashboard/alert consistency test),
    collected from a registry built by the same code for a verdict with a CI."""
    v = Verdict("p", "b", 1.5, "strict", [ShotVerdict("1", 50.0, 50.0, 0.0, -1.0, 1.0, False, "")])
    reg, _ = gauge_registry(v, "r")
    return frozenset(sample.name for fam in reg.collect() for sample in fam.samples)
