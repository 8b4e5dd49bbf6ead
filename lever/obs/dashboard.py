"""Grafana dashboard for Lever runs, generated from code.

Generated rather than hand-exported so that every query is checked against the metrics the
exporter really registers (tests/test_obs_dashboard.py) and thresholds drawn on the panels come from
the same ``AlertConfig`` as the alert rules.  The datasource is a template variable, so the JSON
imports into any Grafana and is provisioned by the sidecar from a ConfigMap labelled
``grafana_dashboard: "1"`` (``dashboard_configmap``; the Helm chart ships
``helm/lever/files/dashboard.json``).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from lever.config.schema import AlertConfig

SCHEMA_VERSION = 39
DASHBOARD_UID = "lever-training"
SEL = '{plan=~"$plan",run_id=~"$run_id"}'


def sel(extra: str) -> str:
    """SEL with one more matcher, e.g. sel('stage="summarize"')."""
    return SEL[:-1] + "," + extra + "}"

DS = {"type": "prometheus", "uid": "${datasource}"}


def _target(expr: str, legend: str, ref: str, instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend}
    if instant:
        t.update(instant=True, range=False, format="time_series")
    return t


def _thresholds(value: Optional[float], color: str = "red") -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if value is not None:
        steps.append({"color": color, "value": value})
    return {"mode": "absolute", "steps": steps}


def _panel(
    title: str,
    targets: list[tuple[str, str]],
    *,
    kind: str = "timeseries",
    unit: str = "short",
    threshold: Optional[float] = None,
    description: str = "",
    minmax: Optional[tuple[float, float]] = None,
) -> dict[str, Any]:
    """One panel without id/gridPos (assigned by ``_layout``)."""
    instant = kind in ("bargauge", "stat")
    defaults: dict[str, Any] = {"unit": unit, "thresholds": _thresholds(threshold)}
    if minmax:
        defaults.update(min=minmax[0], max=minmax[1])
    options: dict[str, Any] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                               "tooltip": {"mode": "multi", "sort": "none"}}
    if kind == "timeseries" and threshold is not None:
        defaults["custom"] = {"thresholdsStyle": {"mode": "line+area"}}
    if instant:
        options = {"orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True,
                   "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return {
        "title": title,
        "type": kind,
        "description": description,
        "datasource": DS,
        "targets": [_target(e, leg, chr(ord("A") + i), instant) for i, (e, leg) in enumerate(targets)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
    }


def _panels(a: AlertConfig) -> list[dict[str, Any]]:
    lp = "{{phase}}"
    report, shards = sel('stage="summarize"'), sel('stage!="summarize"')
    return [
        _panel("KL (policy || reference)", [(f"lever_train_kl{SEL}", f"{lp} {{{{estimator}}}} {{{{run_id}}}}")],
               unit="none", threshold=a.kl_max,
               description="k3 estimator and exact KL over the pointer's candidate distribution; red: alerts.kl_max."),
        _panel("KL change per epoch", [(f"lever_train_kl_epoch_delta{SEL}", f"{lp} {{{{estimator}}}} {{{{run_id}}}}")],
               unit="none", threshold=a.kl_growth_per_epoch),
        _panel("PPO loss", [(f"lever_train_ppo_loss{SEL}", f"{lp} epoch {{{{run_id}}}}"),
                            (f"lever_train_step_ppo_loss{SEL}", f"{lp} step {{{{run_id}}}}")]),
        _panel("Advantage std / max", [(f"lever_train_advantage_std{SEL}", f"std {lp} {{{{run_id}}}}"),
                                       (f"lever_train_advantage_max{SEL}", f"max {lp} {{{{run_id}}}}")],
               description=f"Below {a.adv_std_floor} for {a.adv_std_epochs} GRPO epochs = nothing is learning."),
        _panel("Train / val loss", [(f"lever_train_loss{SEL}", f"train {lp} {{{{run_id}}}}"),
                                    (f"lever_train_val_loss{SEL}", f"val {lp} {{{{run_id}}}}")]),
        _panel("Reward", [(f"lever_train_reward_mean{SEL}", f"mean {lp} {{{{run_id}}}}"),
                          (f"lever_train_reward_std{SEL}", f"std {lp} {{{{run_id}}}}"),
                          (f"lever_train_val_reward{SEL}", f"val greedy {lp} {{{{run_id}}}}")]),
        _panel("Zero-std group share", [(f"lever_train_zero_std_group_ratio{SEL}", f"{lp} {{{{run_id}}}}")],
               unit="percentunit", minmax=(0, 1)),
        _panel("Online rollouts: reward of own samples",
               [(f"lever_train_heldout_reward{SEL}", f"held-out {lp} {{{{run_id}}}}"),
                (f"lever_train_rollout_reward{SEL}", f"rollouts {lp} {{{{run_id}}}}")],
               description="grpo.rollout online: mean reward of the policy's own samples, judged by the LVLM "
                           "(held-out queries: the same draws every epoch)."),
        _panel("Online rollouts: judging cost",
               [(f"lever_train_judgements{SEL}", f"judged {{{{source}}}} {{{{run_id}}}}"),
                (f"lever_train_lvlm_calls{SEL}", f"LVLM calls {{{{run_id}}}}"),
                (f"lever_train_seconds{SEL}", f"seconds {{{{part}}}} {{{{run_id}}}}")],
               unit="short", description="Per epoch: verdicts from the LVLM vs the judged-sequence cache, LVLM "
                                         "calls, seconds judging vs optimising."),
        _panel("KL beta", [(f"lever_train_kl_beta{SEL}", f"{lp} {{{{run_id}}}}")], unit="none"),
        _panel("Clip fraction / entropy", [(f"lever_train_clip_ratio{SEL}", f"clip {lp} {{{{run_id}}}}"),
                                           (f"lever_train_entropy_nats{SEL}", f"entropy {lp} {{{{run_id}}}}")]),
        _panel("Per-step KL and loss", [(f"lever_train_step_kl{SEL}", f"KL {lp} {{{{estimator}}}} {{{{run_id}}}}"),
                                         (f"lever_train_step_loss{SEL}", f"loss {lp} {{{{run_id}}}}")],
               unit="none", description="Last step before each push (pushes are throttled during an epoch)."),
        _panel("Gradient norm", [(f"lever_train_grad_norm{SEL}", f"epoch {lp} {{{{run_id}}}}"),
                                 (f"lever_train_step_grad_norm{SEL}", f"step {lp} {{{{run_id}}}}")]),
        _panel("Per-shot accuracy vs baseline",
               [(f"max by (plan, variant, shot) (lever_infer_accuracy{report})\n"
                 f"or avg by (plan, variant, shot) (lever_infer_accuracy{shards})",
                 "{{plan}} {{variant}} {{shot}}-shot"),
                (f"max by (plan, shot) (lever_nightly_baseline_accuracy{SEL})", "baseline plan {{shot}}-shot")],
               kind="bargauge", unit="percentunit", minmax=(0, 1),
               description="Whole-split accuracy from the report (summarize stage); before it exists, the mean "
                           "over inference shards."),
        _panel("Nightly accuracy minus baseline", [(f"lever_nightly_accuracy_delta{SEL}", "{{plan}} {{shot}}-shot")],
               kind="bargauge", unit="percentunit", threshold=-a.regression_margin / 100.0,
               minmax=(-0.1, 0.1)),
        _panel("Stage durations", [(f"max by (stage) (lever_stage_duration_seconds{SEL})", "{{stage}}")],
               kind="bargauge", unit="s"),
        _panel("Stage runs by outcome", [(f"sum by (stage, outcome) (lever_stage_runs_total{SEL})", "{{stage}} {{outcome}}")],
               kind="bargauge", unit="short"),
        _panel("Progress and LVLM calls",
               [(f"lever_stage_items_done{SEL} / lever_stage_items_planned{SEL}", "{{stage}} {{unit}}"),
                (f"sum by (stage) (lever_lvlm_calls_total{SEL})", "LVLM calls {{stage}}")],
               unit="short"),
        _panel("Divergence signals",
               [(f"lever_train_val_loss_rising_epochs{SEL}", f"val loss rising epochs {lp}"),
                (f"lever_train_advantage_std_low_epochs{SEL}", f"adv std low epochs {lp}"),
                (f"lever_train_loss_nonfinite{SEL}", f"non-finite {lp}")],
               unit="short", threshold=float(a.val_loss_rising_epochs),
               description="Client-side epoch streaks the alerts threshold (see lever/obs/trends.py)."),
        _panel("Time since last report (running stages)",
               [(f"(time() - lever_last_push_timestamp_seconds{SEL}) and lever_stage_running{SEL} == 1",
                 "{{stage}} {{unit}}")],
               unit="s", threshold=a.stalled_minutes * 60.0,
               description="LeverPipelineStalled fires above the red line."),
    ]


def _layout(panels: list[dict[str, Any]], width: int = 12, height: int = 8) -> list[dict[str, Any]]:
    """Two panels per row, ids 1..n in order."""
    out = []
    for i, p in enumerate(panels):
        out.append({"id": i + 1, "gridPos": {"h": height, "w": width, "x": (i % 2) * width, "y": (i // 2) * height}, **p})
    return out


def _variables() -> list[dict[str, Any]]:
    def query_var(name: str, label: str, query: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DS,
            "definition": query,
            "query": {"query": query, "refId": f"{name}-values"},
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {},
            "options": [],
            "sort": 1,
            "hide": 0,
        }

    return [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "options": [], "refresh": 1, "regex": "", "hide": 0},
        query_var("plan", "Plan", "label_values(lever_last_push_timestamp_seconds, plan)"),
        query_var("run_id", "Run", 'label_values(lever_last_push_timestamp_seconds{plan=~"$plan"}, run_id)'),
    ]


def build_dashboard(alerts: Optional[AlertConfig] = None) -> dict[str, Any]:
    """The dashboard as a dict (Grafana dashboard JSON model)."""
    a = alerts or AlertConfig()
    return {
        "uid": DASHBOARD_UID,
        "title": "Lever: training and pipeline",
        "description": "Generated by `lever dashboard render` from lever/obs/dashboard.py; do not edit by hand.",
        "tags": ["lever"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "timezone": "utc",
        "time": {"from": "now-24h", "to": "now"},
        "refresh": "30s",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": _variables()},
        "panels": _layout(_panels(a)),
    }


def render_json(alerts: Optional[AlertConfig] = None) -> str:
    return json.dumps(build_dashboard(alerts), indent=2, sort_keys=False) + "\n"


def dashboard_configmap(namespace: str, name: str = "lever-dashboard", alerts: Optional[AlertConfig] = None) -> dict[str, Any]:
    """ConfigMap picked up by the Grafana sidecar (label ``grafana_dashboard: "1"``)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": {"grafana_dashboard": "1", "app.kubernetes.io/part-of": "lever"}},
        "data": {"lever.json": render_json(alerts)},
    }


def expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression in the dashboard (panel targets and variable queries)."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs
