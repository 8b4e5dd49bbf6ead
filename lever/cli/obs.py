"""``lever alerts render|check`` and ``lever dashboard render``: observability artifacts.

The Helm chart ships files rendered by these commands (``scripts/render_obs.sh``); rendering them
from code keeps the rules, the dashboard and the divergence guard on one set of thresholds.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer

from lever.cli.app import app

alerts_app = typer.Typer(help="Prometheus alert rules (single source: lever/obs/alerts.py).", no_args_is_help=True)
dashboard_app = typer.Typer(help="Grafana dashboard JSON.", no_args_is_help=True)
app.add_typer(alerts_app, name="alerts")
app.add_typer(dashboard_app, name="dashboard")


class RulesFormat(str, enum.Enum):
    rules = "rules"
    prometheusrule = "prometheusrule"


def _alert_config(plan: Optional[str], profile: Optional[str]):
    """Thresholds of a plan (its ``alerts`` section), or the AlertConfig defaults."""
    from lever.config.schema import AlertConfig

    if plan is None:
        return AlertConfig()
    from lever.config import load_plan

    return load_plan(plan, profile=profile).alerts


def _write(text: str, out: Optional[Path]) -> None:
    if out is None:
        typer.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are shipped in the chart
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    typer.echo(f"wrote {out}", err=True)


@alerts_app.command("render")
def alerts_render(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="file to write (default: stdout)"),
    fmt: RulesFormat = typer.Option(
        RulesFormat.rules, "--format", "-f", help="rules (plain rules file = PrometheusRule spec) | prometheusrule"
    ),
    plan: Optional[str] = typer.Option(None, "--plan", help="take thresholds from this plan's alerts section"),
    profile: Optional[str] = typer.Option(None, "--profile", "-p"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="prometheusrule only"),
    for_minutes: Optional[float] = typer.Option(None, "--for-minutes", help="override alerts.for_minutes"),
) -> None:
    """Render the alert rules from AlertConfig."""
    from lever.obs.alerts import render

    alerts = _alert_config(plan, profile)
    if for_minutes is not None:
        alerts = alerts.model_copy(update={"for_minutes": for_minutes})
    _write(render(alerts, fmt.value, namespace=namespace), out)


@alerts_app.command("check")
def alerts_check(
    tests: list[Path] = typer.Argument(None, help="promtool test files (default: tests/promtool/*.yaml)"),
) -> None:
    """Run ``promtool check rules`` on freshly rendered rules and ``promtool test rules`` on the tests."""
    from lever.obs.alerts import render

    promtool = shutil.which("promtool")
    if promtool is None:
        typer.echo("promtool not found (Debian: apt-get install prometheus)", err=True)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules.yaml"
        rules.write_text(render(), encoding="utf-8")
        rc = subprocess.run([promtool, "check", "rules", str(rules)]).returncode
    files = tests or sorted(Path("tests/promtool").glob("*.yaml"))
    if rc == 0 and files:
        rc = subprocess.run([promtool, "test", "rules", *map(str, files)]).returncode
    sys.exit(rc)  # SystemExit, not typer.Exit: lever.cli.main runs click with standalone_mode=False


@dashboard_app.command("render")
def dashboard_render(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="file to write (default: stdout)"),
    configmap: bool = typer.Option(False, "--configmap", help="wrap in a ConfigMap for the Grafana sidecar"),
    namespace: str = typer.Option("monitoring", "--namespace"),
    plan: Optional[str] = typer.Option(None, "--plan", help="draw thresholds from this plan's alerts section"),
    profile: Optional[str] = typer.Option(None, "--profile", "-p"),
) -> None:
    """Render the Grafana dashboard JSON (or its ConfigMap as YAML)."""
    from lever.obs.dashboard import dashboard_configmap, render_json

    alerts = _alert_config(plan, profile)
    if configmap:
        from lever.obs.alerts import to_yaml

        text = to_yaml(dashboard_configmap(namespace, alerts=alerts), header=False)
    else:
        text = render_json(alerts)
        json.loads(text)  # never write something Grafana cannot parse
    _write(text, out)
