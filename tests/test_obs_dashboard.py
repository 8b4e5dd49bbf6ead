"""Grafana dashboard structure, and every query (dashboard and alert rules) against the exporter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lever.config.schema import AlertConfig
from lever.obs.alerts import prometheus_rule_groups
from lever.obs.dashboard import build_dashboard, dashboard_configmap, expressions, render_json
from lever.obs.telemetry import EXPORTED_METRICS, Telemetry, emit_all
from lever.report.regression import exported_metric_names as regress_exported

# Two producers: the stage Telemetry, and `lever regress` (push_gauges), the only producer of the
# nightly gauges.  A query may name a metric of either, nothing else.
ALL_EXPORTED = EXPORTED_METRICS | regress_exported()

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "helm" / "lever" / "files" / "dashboard.json"

PROMQL_FUNCTIONS = {
    "abs", "avg", "count", "max", "min", "sum", "time", "rate", "irate", "increase", "delta", "deriv",
    "max_over_time", "min_over_time", "avg_over_time", "last_over_time", "clamp_min", "clamp_max",
    "label_values", "topk", "bottomk", "vector", "scalar", "absent", "changes", "resets", "round",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: strip strings, label matchers, ranges, grouping clauses
    and numbers; what remains as an identifier not followed by '(' and not a keyword is a metric."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"label_values\(([^,]*),[^)]*\)", r"(\1)", s)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"(?<![A-Za-z_:])\d+(\.\d+)?([eE][+-]?\d+)?", "", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        token, rest = m.group(0), s[m.end():].lstrip()
        if token in PROMQL_KEYWORDS:
            continue
        if rest.startswith("("):
            assert token in PROMQL_FUNCTIONS, f"unknown function {token!r} in {expr!r}"
        else:
            names.add(token)
    return names


def test_metric_name_parser() -> None:
    assert metric_names('max by (plan, shot) (lever_a{plan=~"$plan"}) / lever_b') == {"lever_a", "lever_b"}
    assert metric_names("(time() - lever_c < 86400) and on(plan, run_id) lever_d == 1") == {"lever_c", "lever_d"}
    assert metric_names('label_values(lever_e{plan=~"$plan"}, run_id)') == {"lever_e"}
    assert metric_names("min without(shot) (lever_f) < -0.015 or lever_g > 1e-3") == {"lever_f", "lever_g"}


def test_exported_names_match_a_live_registry() -> None:
    tel = Telemetry("p", "r", "s", None)
    emit_all(tel)
    live = {s.name for fam in tel.registry.collect() for s in fam.samples}
    assert live == set(EXPORTED_METRICS)


def test_dashboard_queries_name_only_exported_metrics() -> None:
    dash = build_dashboard()
    used: set[str] = set()
    for expr in expressions(dash):
        names = metric_names(expr)
        assert names, f"query selects no metric: {expr!r}"
        unknown = names - ALL_EXPORTED
        assert not unknown, f"{expr!r} names metrics the exporter does not export: {unknown}"
        used |= names
    required = {"lever_train_kl", "lever_train_ppo_loss", "lever_train_advantage_std", "lever_train_val_loss",
                "lever_train_loss", "lever_train_reward_mean", "lever_train_reward_std",
                "lever_train_zero_std_group_ratio", "lever_train_kl_beta", "lever_infer_accuracy",
                "lever_nightly_baseline_accuracy", "lever_stage_duration_seconds"}
    assert required <= used, required - used


def test_alert_rules_name_only_exported_metrics() -> None:
    for group in prometheus_rule_groups(AlertConfig()):
        for rule in group["rules"]:
            names = metric_names(rule["expr"])
            assert names and names <= ALL_EXPORTED, (rule["alert"], names - ALL_EXPORTED)


def test_nightly_gauges_have_one_producer() -> None:
    """Stage telemetry exports no nightly gauge; `lever regress` exports the ones the dashboard
    and the nightly alert read (so a nightly number always comes from the CI-based verdict)."""
    nightly = regress_exported()
    assert not {n for n in EXPORTED_METRICS if n.startswith("lever_nightly_")}
    assert {"lever_nightly_regression", "lever_nightly_accuracy_delta", "lever_nightly_baseline_accuracy",
            "lever_last_push_timestamp_seconds"} <= nightly
    rule = next(r for g in prometheus_rule_groups(AlertConfig()) for r in g["rules"] if r["alert"] == "LeverNightlyRegression")
    assert {n for n in metric_names(rule["expr"]) if n.startswith("lever_nightly_")} == {"lever_nightly_regression"}
    used = set().union(*(metric_names(e) for e in expressions(build_dashboard())))
    assert {n for n in used if n.startswith("lever_nightly_")} <= nightly


def test_dashboard_structure() -> None:
    dash = json.loads(render_json())
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("plan", "run_id"):
        assert variables[name]["type"] == "query"
        assert variables[name]["definition"].startswith("label_values(")
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y")) and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert '$plan' in t["expr"] and '$run_id' in t["expr"], t["expr"]


def test_thresholds_follow_alert_config() -> None:
    dash = build_dashboard(AlertConfig(kl_max=9.5))
    kl = next(p for p in dash["panels"] if p["title"].startswith("KL (policy"))
    assert kl["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"] == 9.5


def test_configmap_for_grafana_sidecar() -> None:
    cm = dashboard_configmap("monitoring")
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (name, body), = cm["data"].items()
    assert name.endswith(".json") and json.loads(body)["uid"] == "lever-training"


def test_shipped_dashboard_is_current() -> None:
    if not SHIPPED.exists():
        pytest.fail(f"{SHIPPED} missing: run scripts/render_obs.sh")
    assert SHIPPED.read_text(encoding="utf-8") == render_json(), "stale dashboard.json: run scripts/render_obs.sh"
