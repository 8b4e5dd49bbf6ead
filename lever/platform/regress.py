"""Compatibility name for the regression verdict, which lives in :mod:`lever.report.regression`.

The nightly (``lever regress``), the report's ``regression`` section and the alert share one
verdict; it moved next to the report that produces the numbers it judges.  Old imports
(``from lever.platform.regress import judge, push_gauges, ReportFormatError, RULES``) keep working.
"""

from __future__ import annotations

from lever.report.regression import (
    NIGHTLY_GAUGES,
    RULES,
    ReportFormatError,
    Rule,
    ShotVerdict,
    Verdict,
    exported_metric_names,
    gauge_registry,
    judge,
    push_gauges,
    report_section,
)

__all__ = ["NIGHTLY_GAUGES", "RULES", "ReportFormatError", "Rule", "ShotVerdict", "Verdict", "exported_metric_names",
           "gauge_registry", "judge", "push_gauges", "report_section"]
