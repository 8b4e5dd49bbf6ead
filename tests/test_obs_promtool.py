"""Alert rules: shipped file is current, promtool accepts it, and the promtool unit tests pass and
are sensitive to the thresholds (a mutated rules file must fail them)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lever.config.schema import AlertConfig
from lever.obs.alerts import alert_names, prometheus_rule, render, rules_file
from lever.obs.dashboard import build_dashboard

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "helm" / "lever" / "files" / "alert-rules.yaml"
PROMTOOL_TESTS = sorted((ROOT / "tests" / "promtool").glob("*.yaml"))
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus; CI installs it)"
)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_shipped_rules_are_current() -> None:
    assert SHIPPED.exists(), f"{SHIPPED} missing: run scripts/render_obs.sh"
    assert SHIPPED.read_text(encoding="utf-8") == render(AlertConfig()), "stale alert-rules.yaml: run scripts/render_obs.sh"


def test_every_alert_from_the_brief_exists_and_thresholds_come_from_config() -> None:
    assert set(alert_names()) == {
        "LeverKLAboveThreshold", "LeverKLGrowingFast", "LeverNonFiniteLoss", "LeverAdvantageStdCollapsed",
        "LeverValLossRising", "LeverPipelineStalled", "LeverNightlyRegression",
    }
    cfg = AlertConfig(kl_max=7.5, kl_growth_per_epoch=1.25, adv_std_floor=0.02, adv_std_epochs=4,
                      val_loss_rising_epochs=9, stalled_minutes=45, regression_margin=2.0, for_minutes=0.5,
                      retention_hours=2)
    rules = {r["alert"]: r for g in rules_file(cfg)["groups"] for r in g["rules"]}
    assert "lever_train_kl > 7.5" in rules["LeverKLAboveThreshold"]["expr"]
    assert "> 1.25" in rules["LeverKLGrowingFast"]["expr"]
    assert "< 0.02" in rules["LeverAdvantageStdCollapsed"]["expr"] and ">= 4" in rules["LeverAdvantageStdCollapsed"]["expr"]
    assert ">= 9" in rules["LeverValLossRising"]["expr"]
    assert "> 2700" in rules["LeverPipelineStalled"]["expr"]
    # the nightly alert reads only the CI-based flag of `lever regress`; margin and rule reach it
    # through that verdict and are named in its annotations
    nightly = rules["LeverNightlyRegression"]
    assert "max without(shot) (lever_nightly_regression) == 1" in nightly["expr"]
    assert "lever_nightly_accuracy_delta" not in nightly["expr"] and "< 7200" in nightly["expr"]
    assert "more than 2 points" in nightly["annotations"]["summary"]
    assert "rule strict" in nightly["annotations"]["description"]
    assert "rule significant" in {r["alert"]: r for g in rules_file(AlertConfig(regression_rule="significant"))["groups"]
                                  for r in g["rules"]}["LeverNightlyRegression"]["annotations"]["description"]
    assert "< 7200" in rules["LeverKLAboveThreshold"]["expr"]
    assert rules["LeverKLAboveThreshold"]["for"] == "30s"


def test_prometheusrule_wraps_the_same_groups() -> None:
    obj = prometheus_rule(AlertConfig(), namespace="lever")
    assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "PrometheusRule"
    assert obj["metadata"]["namespace"] == "lever"
    assert obj["spec"] == yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    assert yaml.safe_load(render(AlertConfig(), "prometheusrule", namespace="lever")) == obj


@needs_promtool
def test_promtool_check_rules(tmp_path: Path) -> None:
    res = promtool("check", "rules", str(SHIPPED))
    assert res.returncode == 0, res.stdout + res.stderr
    # the PrometheusRule object's spec, extracted as promtool needs it
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(yaml.safe_load(render(AlertConfig(), "prometheusrule"))["spec"]), encoding="utf-8")
    res = promtool("check", "rules", str(spec))
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_promtool_test_rules() -> None:
    assert PROMTOOL_TESTS, "no promtool test files under tests/promtool/"
    res = promtool("test", "rules", *map(str, PROMTOOL_TESTS))
    assert res.returncode == 0, res.stdout + res.stderr
    text = "".join(p.read_text(encoding="utf-8") for p in PROMTOOL_TESTS)
    for name in alert_names():  # every alert is exercised
        assert f"alertname: {name}" in text, name


@needs_promtool
@pytest.mark.parametrize(
    "mutation, expected_failure",
    [
        ({"kl_max": 20.0}, "LeverKLAboveThreshold"),
        ({"retention_hours": 48.0}, "LeverKLAboveThreshold"),
        ({"adv_std_epochs": 5}, "LeverAdvantageStdCollapsed"),
        ({"val_loss_rising_epochs": 3}, "LeverValLossRising"),
        ({"stalled_minutes": 60}, "LeverPipelineStalled"),
        ({"regression_margin": 2.5}, "LeverNightlyRegression"),
        ({"regression_rule": "significant"}, "LeverNightlyRegression"),
    ],
)
def test_promtool_tests_catch_wrong_thresholds(tmp_path: Path, mutation: dict, expected_failure: str) -> None:
    """Same test files against rules rendered with another threshold: promtool must report the alert."""
    files = tmp_path / "helm" / "lever" / "files"
    files.mkdir(parents=True)
    (files / "alert-rules.yaml").write_text(render(AlertConfig(**mutation)), encoding="utf-8")
    tests = tmp_path / "tests" / "promtool"
    tests.mkdir(parents=True)
    for p in PROMTOOL_TESTS:
        shutil.copy(p, tests / p.name)
    res = promtool("test", "rules", *[str(tests / p.name) for p in PROMTOOL_TESTS])
    assert res.returncode != 0
    assert f"alertname: {expected_failure}" in res.stdout + res.stderr


@needs_promtool
def test_chart_prometheusrule_passes_the_same_promtool_tests(tmp_path: Path) -> None:
    """Render the Helm chart, pull the PrometheusRule's spec out, and run the unit tests on it."""
    helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (test extra)")
    out = helm_python.Chart.load(str(ROOT / "helm" / "lever")).render({}, name="rel", namespace="lever")
    docs = [d for path, text in out.items() if path.endswith((".yaml", ".yml")) for d in yaml.safe_load_all(text) if d]
    (rule,) = [d for d in docs if d.get("kind") == "PrometheusRule"]
    assert rule["spec"] == rules_file(AlertConfig())
    (cm,) = [d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert json.loads(next(iter(cm["data"].values()))) == build_dashboard()
    files = tmp_path / "helm" / "lever" / "files"
    files.mkdir(parents=True)
    (files / "alert-rules.yaml").write_text(yaml.safe_dump(rule["spec"]), encoding="utf-8")
    tests = tmp_path / "tests" / "promtool"
    tests.mkdir(parents=True)
    for p in PROMTOOL_TESTS:
        shutil.copy(p, tests / p.name)
    res = promtool("test", "rules", *[str(tests / p.name) for p in PROMTOOL_TESTS])
    assert res.returncode == 0, res.stdout + res.stderr
