"""``lever alerts render`` / ``lever dashboard render`` write what the Helm chart ships."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lever.cli import main
from lever.config.schema import AlertConfig
from lever.obs.alerts import render
from lever.obs.dashboard import render_json

ROOT = Path(__file__).resolve().parents[1]


def test_alerts_render_rules_and_prometheusrule(tmp_path: Path) -> None:
    out = tmp_path / "rules.yaml"
    main(["alerts", "render", "--out", str(out)])
    assert out.read_text(encoding="utf-8") == render(AlertConfig())
    cr = tmp_path / "cr.yaml"
    main(["alerts", "render", "--format", "prometheusrule", "--namespace", "lever", "--for-minutes", "0", "--out", str(cr)])
    obj = yaml.safe_load(cr.read_text(encoding="utf-8"))
    assert obj["kind"] == "PrometheusRule" and obj["metadata"]["namespace"] == "lever"
    assert {r["for"] for g in obj["spec"]["groups"] for r in g["rules"]} == {"0s"}


def test_alerts_render_rejects_unknown_format(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "lever", "alerts", "render", "--format", "yaml", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode != 0 and not (tmp_path / "x").exists()
    assert "yaml" in res.stderr


def test_alerts_check_runs_promtool() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus; CI installs it)")
    res = subprocess.run([sys.executable, "-m", "lever", "alerts", "check"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_alerts_render_from_a_plan() -> None:
    res = subprocess.run([sys.executable, "-m", "lever", "alerts", "render", "--plan", "plan5"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load(res.stdout)["groups"][0]["name"] == "lever-training"


def test_dashboard_render(tmp_path: Path) -> None:
    out = tmp_path / "d" / "dashboard.json"
    main(["dashboard", "render", "--out", str(out)])
    assert out.read_text(encoding="utf-8") == render_json()
    cm = tmp_path / "cm.yaml"
    main(["dashboard", "render", "--configmap", "--namespace", "grafana", "--out", str(cm)])
    obj = yaml.safe_load(cm.read_text(encoding="utf-8"))
    assert obj["metadata"]["labels"]["grafana_dashboard"] == "1" and obj["metadata"]["namespace"] == "grafana"
    assert json.loads(obj["data"]["lever.json"])["schemaVersion"] >= 36


def test_render_script_writes_helm_files(tmp_path: Path) -> None:
    """scripts/render_obs.sh run on a scratch copy (never rewrites the checkout under test)."""
    scratch = tmp_path / "repo"
    (scratch / "scripts").mkdir(parents=True)
    (scratch / "scripts" / "render_obs.sh").write_bytes((ROOT / "scripts" / "render_obs.sh").read_bytes())
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(["bash", "scripts/render_obs.sh"], cwd=scratch, capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    files = scratch / "helm" / "lever" / "files"
    assert (files / "alert-rules.yaml").read_text(encoding="utf-8") == render(AlertConfig())
    assert (files / "dashboard.json").read_text(encoding="utf-8") == render_json()
