"""``lever render``, ``lever submit`` and ``lever regress``: the Kubernetes side of the CLI.

``render`` and ``submit`` only build manifests (Hera, no torch); ``regress`` is the nightly
verdict step.  Exit codes follow the pipeline contract: 2 = the user must fix something (unknown
plan, missing report, bad flags), 1 = ``regress`` found a regression.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from lever.cli.app import app

ENV_SERVER = "ARGO_SERVER"
ENV_TOKEN = "ARGO_TOKEN"
ENV_NAMESPACE = "ARGO_NAMESPACE"
ENV_INSECURE = "ARGO_INSECURE_SKIP_VERIFY"


def _fail(msg: str, code: int = 2) -> SystemExit:
    """SystemExit, not typer.Exit: ``lever.cli.main`` runs click with ``standalone_mode=False``,
    where a typer.Exit code is returned instead of becoming the process status."""
    typer.echo(f"error: {msg}", err=True)
    return SystemExit(code)


@app.command("render")
def render_cmd(
    plan: Optional[str] = typer.Argument(None, help="plan to render a Workflow for (omit with --all)"),
    profile: str = typer.Option("cluster", "--profile", "-p", help="profile the pods run the plan with"),
    set_: list[str] = typer.Option([], "--set", help="config override KEY=VALUE for every pod (repeatable); "
                                   "validated against the plan schema, sent as the 'overrides' parameter"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write to FILE instead of stdout"),
    all_: bool = typer.Option(False, "--all", help="write every generated file (workflows/ and the chart's files/)"),
    out: Path = typer.Option(Path("workflows"), "--out", help="with --all: directory for the Workflow files"),
    chart: Optional[Path] = typer.Option(None, "--chart", help="with --all: chart dir whose files/ get the template and cron (default: helm/lever next to --out)"),
) -> None:
    """Render a plan's Argo Workflow (``argo submit``-able), or with --all regenerate every committed file."""
    from lever.config.loader import PlanError
    from lever.platform import render

    if all_:
        if plan is not None or set_:
            raise _fail("give either PLAN (with --set) or --all, not both")
        chart_dir = chart if chart is not None else out.resolve().parent / "helm" / "lever"
        written = render.write_all(out, chart_dir)
        for p in written:
            typer.echo(f"wrote {p}")
        return
    if plan is None:
        raise _fail("missing PLAN (or --all)")
    try:
        wf = render.plan_workflow(plan, profile, set_)
    except PlanError as exc:
        raise _fail(str(exc)) from None
    text = render.HEADER + render.to_yaml(wf) if output else render.to_yaml(wf)
    if output:
        render.write_atomic(output, text)
        typer.echo(f"wrote {output}", err=True)
    else:
        sys.stdout.write(text)


def build_submission(plan: str, profile: str, *, host: str, token: Optional[str], namespace: str,
                     verify_ssl: bool = True, session: Any = None, overrides: Optional[list[str]] = None):
    """The Hera ``Workflow`` bound to a ``WorkflowsService``; separated from ``submit`` so the
    request can be built and inspected without a server."""
    from hera.workflows import WorkflowsService

    from lever.platform import render

    wf = render.plan_workflow(plan, profile, overrides or [])
    wf.namespace = namespace
    wf.workflows_service = WorkflowsService(host=host, token=token, namespace=namespace,
                                            verify_ssl=verify_ssl, session=session)
    return wf


VIA_KUBE = "kube"
VIA_ARGO = "argo-server"


@app.command("submit")
def submit_cmd(
    plan: str = typer.Argument(..., help="plan to run on the cluster"),
    profile: str = typer.Option("cluster", "--profile", "-p"),
    set_: list[str] = typer.Option([], "--set", help="config override KEY=VALUE for every pod (repeatable); "
                                   "validated against the plan schema before submission"),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help=f"kube: the kubeconfig context's; "
                                            f"argo-server: ${ENV_NAMESPACE}; else the platform namespace"),
    via: Optional[str] = typer.Option(None, "--via", help=f"{VIA_KUBE}: create the Workflow through the Kubernetes API "
                                      f"(default unless ${ENV_SERVER} is set); {VIA_ARGO}: through the Argo server"),
    server: Optional[str] = typer.Option(None, "--server", help=f"Argo server URL (default ${ENV_SERVER}; implies --via {VIA_ARGO})"),
    kubeconfig: Optional[Path] = typer.Option(None, "--kubeconfig", help="kubeconfig file (default $KUBECONFIG or ~/.kube/config; in a pod: its service account)"),
    context: Optional[str] = typer.Option(None, "--context", help="kubeconfig context (default: the current one)"),
) -> None:
    """Submit PLAN (the ``lever-pipeline`` template must be installed): as a Workflow object through
    the Kubernetes API, or through the Argo server.  The plan and the overrides are validated
    first; nothing is created when they are wrong."""
    from lever.config.loader import PlanError
    from lever.platform import render

    host = server or os.environ.get(ENV_SERVER)
    via = via or (VIA_ARGO if host else VIA_KUBE)
    if via not in (VIA_KUBE, VIA_ARGO):
        raise _fail(f"--via must be {VIA_KUBE} or {VIA_ARGO}, got {via!r}")
    if via == VIA_KUBE:
        try:
            wf = render.plan_workflow(plan, profile, set_)
        except PlanError as exc:
            raise _fail(_one_line(exc)) from None
        _submit_kube(wf, namespace, kubeconfig, context)
        return
    if not host:
        raise _fail(f"set {ENV_SERVER} (e.g. https://argo.example.com:2746) or pass --server")
    if not host.startswith(("http://", "https://")):
        host = "https://" + host
    ns = namespace or os.environ.get(ENV_NAMESPACE) or render.cluster_platform().namespace
    verify = os.environ.get(ENV_INSECURE, "").lower() not in ("1", "true", "yes")
    try:
        wf = build_submission(plan, profile, host=host, token=os.environ.get(ENV_TOKEN), namespace=ns, verify_ssl=verify,
                              overrides=set_)
    except PlanError as exc:
        raise _fail(str(exc)) from None
    try:
        created = wf.create()
    except Exception as exc:  # connection refused, 401/403, template missing: all fixable by the user
        raise _fail(f"submission to {host} failed: {exc}") from None
    name = created.metadata.name
    typer.echo(name)
    typer.echo(wf.workflows_service.get_workflow_link(name))


def _one_line(exc: Exception) -> str:
    """A multi-line plan error ("invalid plan:" + one indented line per problem) as one line."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


def _submit_kube(wf: Any, namespace: Optional[str], kubeconfig: Optional[Path], context: Optional[str]) -> None:
    """Create the rendered Workflow as a custom object; print its name and how to follow it."""
    from lever.cli.runs import connect
    from lever.platform import kube

    k = connect(namespace, kubeconfig, context)
    body = wf.to_dict()
    body.setdefault("metadata", {})["namespace"] = k.namespace
    try:
        created = k.create_workflow(body)
    except kube.KubeError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    name = created["metadata"]["name"]
    typer.echo(name)
    typer.echo(f"follow it: lever status {name} -n {k.namespace} --watch", err=True)


def _load_report(report: Optional[Path], store: Optional[str], plan: str, baseline: str, profile: str,
                 overrides: Optional[list[str]] = None) -> dict:
    """The plan's report.json: an explicit file, or the summarize artifact of (plan, baseline)
    located in the store by its content key (computed from the configs, as the runner does)."""
    if report is not None:
        try:
            return json.loads(report.read_text())
        except FileNotFoundError:
            raise _fail(f"{report}: no such report") from None
        except json.JSONDecodeError as exc:
            raise _fail(f"{report}: invalid JSON: {exc}") from None
    if not store:
        raise _fail("give --store (s3://BUCKET/PREFIX or a directory) or --report FILE")
    from lever.config import load_plan
    from lever.pipeline.graph import STAGES
    from lever.pipeline.runner import Pipeline
    from lever.storage.backends import open_store
    from lever.storage.store import CorruptArtifact

    from lever.pipeline.runner import baseline_overrides

    ov = list(overrides or [])
    pipe = Pipeline(load_plan(plan, profile, ov), open_store(store),
                    baseline=load_plan(baseline, profile, baseline_overrides(ov)))
    stage = next((s.name for s in STAGES if getattr(s, "with_baseline", False)), "summarize")
    unit = pipe.select_units(stage)[0]
    key = pipe.key(stage, unit)
    try:
        path = pipe.store.open(key) / "report.json"
    except (KeyError, CorruptArtifact) as exc:
        raise _fail(f"no usable {stage} artifact for {plan} vs {baseline} at {pipe.store.location(key)} ({exc}); "
                    f"run the plan first") from None
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise _fail(f"{path}: unreadable report ({exc})") from None


@app.command("regress")
def regress_cmd(
    plan: str = typer.Option(..., "--plan", help="plan under test (the nightly's recommended plan)"),
    baseline: str = typer.Option("baseline", "--baseline"),
    margin: Optional[float] = typer.Option(None, "--margin", help="accuracy points the plan may trail the baseline by (default: the plan's alerts.regression_margin)"),
    rule: Optional[str] = typer.Option(None, "--rule", help="strict: CI upper bound < -margin; significant: diff < -margin and CI upper bound < 0 (default: the plan's alerts.regression_rule)"),
    store: Optional[str] = typer.Option(None, "--store"),
    report: Optional[Path] = typer.Option(None, "--report", help="read this report.json instead of the store"),
    profile: str = typer.Option("cluster", "--profile", "-p"),
    run_id: str = typer.Option("", "--run-id", help="labels the pushed gauges"),
    pushgateway: Optional[str] = typer.Option(None, "--pushgateway", help="default $LEVER_PUSHGATEWAY_URL; empty = no push"),
    set_: list[str] = typer.Option([], "--set", help="config override KEY=VALUE (repeatable)"),
    overrides: str = typer.Option("", "--overrides", help="JSON list of KEY=VALUE overrides (the Argo 'overrides' parameter)"),
) -> None:
    """Fail (exit 1) when any shot of PLAN's report is below BASELINE by more than MARGIN, judged
    with the report's confidence intervals (the same verdict as the report's regression section);
    push ``lever_nightly_regression`` per shot, the only producer of the nightly gauges."""
    from lever.report.regression import RULES, ReportFormatError, judge, push_gauges

    from lever.config.loader import parse_overrides

    if rule is not None and rule not in RULES:
        raise _fail(f"--rule must be one of {', '.join(RULES)}")
    ov = [*set_, *parse_overrides(overrides)]  # PlanError -> exit 2 (lever.cli.main)
    if rule is None or margin is None:
        from lever.config import load_plan

        alerts = load_plan(plan, profile, ov).alerts
        rule = alerts.regression_rule if rule is None else rule
        margin = alerts.regression_margin if margin is None else margin
    data = _load_report(report, store, plan, baseline, profile, ov)
    try:
        verdict = judge(data, plan=plan, baseline=baseline, margin=margin, rule=rule)
    except (ReportFormatError, ValueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(verdict.table())
    url = pushgateway if pushgateway is not None else os.environ.get("LEVER_PUSHGATEWAY_URL", "")
    if url:
        try:
            push_gauges(verdict, url, run_id or "manual")
        except Exception as exc:  # the verdict (exit code) matters more than the metric
            typer.echo(f"warning: could not push gauges to {url}: {exc}", err=True)
    if verdict.regression:
        raise SystemExit(1)
