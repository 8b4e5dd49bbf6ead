"""One regression verdict: the report's section, ``lever regress`` and the alert's flag agree.

The report used to flag a regression on the point estimate alone (worst diff < -margin); now it
runs :func:`lever.report.regression.judge` on its own comparison, with the plan's rule."""

from __future__ import annotations

import json

import pytest

import lever.config
from lever.report.bootstrap import PairedCI
from lever.report.regression import report_section
from lever.report.render import _regression

REAL_LOAD_PLAN = lever.config.load_plan
UNITS = "accuracy in percent (VQA accuracy x 100); predictions files hold 0..1"


def _entry(shot: int, plan: float, base: float, lo: float, hi: float) -> dict:
    ci = PairedCI(n=800, diff=(plan - base) / 100, low=lo / 100, high=hi / 100, p_value=0.04)
    return {"shot": shot, "plan": plan, "baseline": base, "diff": round(plan - base, 2), "paired": ci.as_dict(100.0)}


def _report(*entries: dict, partial: bool = False) -> dict:
    return {"schema_version": 1, "units": UNITS, "partial": partial, "missing": [], "incomplete_cells": [],
            "baseline_plan": "baseline", "comparison": list(entries)}


# shot 1: 2 points down on the point estimate, but the CI reaches +0.5 (noise at 800 samples);
# shot 2: 2 points down and the CI excludes 0, but its upper bound is within the margin
NOISY = _entry(1, 50.0, 52.0, -4.5, 0.5)
SIGNIFICANT = _entry(2, 50.0, 52.0, -3.6, -0.4)
CLEAR = _entry(3, 45.0, 52.0, -9.5, -4.5)


def test_point_estimate_past_the_margin_is_not_a_strict_regression():
    sec = report_section(_report(NOISY, SIGNIFICANT), plan="plan5", baseline="baseline", margin=1.5)
    assert sec["available"] and sec["rule"] == "strict" and sec["detected"] is False
    assert [s["regression"] for s in sec["shots"]] == [False, False]
    assert "CI upper bound +0.50 >= -1.5" in sec["shots"][0]["reason"]
    sig = report_section(_report(NOISY, SIGNIFICANT), plan="plan5", baseline="baseline", margin=1.5, rule="significant")
    assert sig["detected"] is True and [s["regression"] for s in sig["shots"]] == [False, True]
    assert sig["reason"].startswith("shot 2:")


def test_clear_drop_is_flagged_and_rendered():
    sec = report_section(_report(NOISY, CLEAR), plan="plan5", baseline="baseline", margin=1.5)
    assert sec["detected"] is True and [s["regression"] for s in sec["shots"]] == [False, True]
    assert sec["shots"][1]["ci_high"] == pytest.approx(-4.5) and sec["shots"][1]["diff"] == pytest.approx(-7.0)
    lines = _regression(sec)
    assert "rule `strict`" in lines[0] and "**REGRESSION**" in lines[0] and "shot 3" in lines[0]
    assert lines[1].startswith("- shot 1: ok") and lines[2].startswith("- shot 3: REGRESSION")
    json.dumps(sec, allow_nan=False)  # goes into report.json as is


def test_unjudgeable_reports_say_so_instead_of_raising():
    partial = report_section(dict(_report(CLEAR, partial=True), missing=["infer/variantselector-shot1"]),
                             plan="p", baseline="baseline", margin=1.5)
    assert partial["available"] is False and partial["detected"] is False
    assert "partial report" in partial["reason"] and "infer/variantselector-shot1" in partial["reason"]
    assert "verdict not available" in _regression(partial)[0]
    no_base = report_section(_report(CLEAR), plan="baseline", baseline=None, margin=1.5)
    assert no_base["available"] is False and "no baseline" in no_base["reason"]
    hole = _report(CLEAR, dict(NOISY, baseline=None))
    bad = report_section(hole, plan="p", baseline="baseline", margin=1.5)
    assert bad["available"] is False and "shot 1" in bad["reason"]


def _regress_cli(monkeypatch, tmp_path, capsys, rep: dict, *extra: str, overrides: tuple[str, ...] = ()) -> int:
    """Run `lever regress` in-process with the plan config resolved with ``overrides``."""
    from lever.cli import main

    monkeypatch.setattr(lever.config, "load_plan",
                        lambda name, profile=None, o=(): REAL_LOAD_PLAN(name, "tiny", list(overrides)))
    monkeypatch.setenv("LEVER_PUSHGATEWAY_URL", "")
    path = tmp_path / "report.json"
    path.write_text(json.dumps(rep))
    with pytest.raises(SystemExit) as exc:
        main(["regress", "--plan", "plan5", "--report", str(path), *extra])
        raise SystemExit(0)
    capsys.readouterr()
    return exc.value.code


def test_regress_takes_rule_and_margin_from_the_plan(monkeypatch, tmp_path, capsys):
    rep = _report(NOISY, SIGNIFICANT)
    assert _regress_cli(monkeypatch, tmp_path, capsys, rep) == 0  # plan5: strict
    assert _regress_cli(monkeypatch, tmp_path, capsys, rep, overrides=("alerts.regression_rule=significant",)) == 1
    # an explicit flag still wins over the config
    assert _regress_cli(monkeypatch, tmp_path, capsys, rep, "--rule", "strict",
                        overrides=("alerts.regression_rule=significant",)) == 0
    # margin from the config too: shot 2's CI upper bound -0.4 is past a 0.3 margin under strict
    assert _regress_cli(monkeypatch, tmp_path, capsys, rep, overrides=("alerts.regression_margin=0.3",)) == 1
    assert _regress_cli(monkeypatch, tmp_path, capsys, rep, "--margin", "1.5",
                        overrides=("alerts.regression_margin=0.3",)) == 0
