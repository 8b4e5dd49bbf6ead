"""``lever status``, ``lever logs``, ``lever runs``, ``lever delete`` and ``lever report --fetch``:
following a run on the cluster through the Kubernetes API (no Argo server needed).

A RUN is named by its Workflow name, its run id (label ``lever.dev/run-id``) or, for status, a
plan (its newest run).  The report's place is computed, not looked up: the summarize artifact's
content key follows from the run's plan, profile and overrides (the Workflow's parameters),
exactly as the summarize pod computed it; a failed run's partial report sits under
``partial/<plan>/<run-id>``.  Exit codes: 2 = the user must fix something (no credentials,
forbidden, no such run), 1 = the run failed (status/watch) or the cluster is unreachable.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from lever.cli.app import app

NS_HELP = "namespace (default: the kubeconfig context's, else the platform namespace)"
KUBECONFIG_HELP = "kubeconfig file (default $KUBECONFIG or ~/.kube/config; in a pod: its service account)"
CONTEXT_HELP = "kubeconfig context (default: the current one)"
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def _fail(msg: str, code: int = 2) -> SystemExit:
    typer.echo(f"error: {msg}", err=True)
    return SystemExit(code)


def connect(namespace: Optional[str], kubeconfig: Optional[Path] = None, context: Optional[str] = None):
    """A ``Kube`` client, or exit with the one-line reason (exit 2 for missing credentials)."""
    from lever.platform import kube
    from lever.platform.render import cluster_platform

    try:
        return kube.connect(namespace, context=context, kubeconfig=str(kubeconfig) if kubeconfig else None,
                            default_namespace=cluster_platform().namespace)
    except kube.KubeError as exc:
        raise _fail(str(exc), exc.exit_code) from None


def _newest(items: list[dict]) -> Optional[dict]:
    return max(items, key=lambda w: w["metadata"].get("creationTimestamp") or "", default=None)


def resolve_run(k: Any, ref: Optional[str], *, plan_ok: bool = True) -> dict:
    """The Workflow ``ref`` names: its name, else its run id label, else (``plan_ok``) the newest
    run of that plan; no ref: the newest Lever run in the namespace."""
    from lever.platform import kube
    from lever.platform.runs import PART_OF_SELECTOR, PLAN_LABEL, RUN_ID_LABEL

    if ref is None:
        wf = _newest(k.list_workflows(PART_OF_SELECTOR))
        if wf is None:
            raise kube.KubeError(f"no Lever runs in namespace {k.namespace}", kube.USER_ERROR)
        return wf
    try:
        return k.get_workflow(ref)
    except kube.KubeError as exc:
        if exc.status != 404:
            raise
    if _LABEL_VALUE.match(ref):
        for label in (RUN_ID_LABEL, PLAN_LABEL) if plan_ok else (RUN_ID_LABEL,):
            wf = _newest(k.list_workflows(f"{PART_OF_SELECTOR},{label}={ref}"))
            if wf is not None:
                return wf
    what = "workflow, run id or plan" if plan_ok else "workflow or run id"
    raise kube.KubeError(f"no {what} {ref!r} in namespace {k.namespace} (see `lever runs`)", kube.USER_ERROR)


def report_location(params: dict[str, str], run_id: str, *, partial: bool, store: Optional[str] = None):
    """(store, key) of a run's report: the summarize unit's content key computed from the run's
    plan, profile and overrides as the summarize pod did, or the exit handler's partial key."""
    from lever.config import load_plan
    from lever.config.loader import parse_overrides
    from lever.pipeline.runner import Pipeline, load_baseline
    from lever.storage.backends import open_store

    url = store or params.get("store")
    if not url:
        raise ValueError("the run records no 'store' parameter; pass --store")
    plan, profile = params.get("plan", ""), params.get("profile") or None
    overrides = parse_overrides(params.get("overrides", "") or "")
    cfg = load_plan(plan, profile, overrides)
    st = open_store(url)
    if partial:
        return st, f"partial/{cfg.name}/{run_id}"
    pipe = Pipeline(cfg, st, baseline=load_baseline(cfg, profile, overrides), run_id=run_id)
    return st, pipe.key("summarize", pipe.select_units("summarize")[0])


def _with_report(rs: Any, store: Optional[str] = None) -> Any:
    """Fill ``rs.report`` once a summarize has run (the full report, else the partial one)."""
    if not (rs.summarized or rs.partial_summarized):
        return rs
    try:
        st, key = report_location(rs.parameters, rs.run_id, partial=not rs.summarized, store=store)
        rs.report = st.location(key, "report.md")
    except Exception as exc:  # noqa: BLE001 - a status display must not die on the report path
        rs.report = f"(unknown: {exc})"
    return rs


def _pods_by_node(k: Any, workflow: str) -> dict[str, Any]:
    from lever.platform.kube import ARGO_NODE_ID_ANNOTATION, ARGO_WORKFLOW_LABEL

    out = {}
    for pod in k.list_pods(f"{ARGO_WORKFLOW_LABEL}={workflow}"):
        node = (pod.metadata.annotations or {}).get(ARGO_NODE_ID_ANNOTATION)
        if node:
            out[node] = pod
    return out


def _name_failed_pods(k: Any, rs: Any) -> None:
    if not rs.failures:
        return
    pods = _pods_by_node(k, rs.name)
    for f in rs.failures:
        pod = pods.get(f.node_id)
        f.pod = pod.metadata.name if pod is not None else None


def _print_status(rs: Any, changed_only: Optional[dict[str, str]] = None) -> None:
    """Stage lines; with ``changed_only`` (the last printed line per stage) only what changed."""
    from lever.platform.runs import format_duration, duration_s, stage_line

    if changed_only is None:
        typer.echo(f"{rs.name}  plan {rs.plan}  run {rs.run_id}  {rs.phase}  progress {rs.progress or '-'}  "
                   f"started {rs.started or '-'}  duration {format_duration(duration_s(rs.started, rs.finished))}")
    for p in rs.stages:
        if p.phase == "Pending" and changed_only is None:
            continue
        line = stage_line(p)
        key = f"{p.section}/{p.stage}"
        if changed_only is not None:
            if changed_only.get(key) == line or (p.phase == "Pending" and key not in changed_only):
                continue
            changed_only[key] = line
        typer.echo(("  " if changed_only is None else f"[{rs.phase}] ") + line)


def _print_end(rs: Any) -> None:
    for f in rs.failures:
        code = f" exit code {f.exit_code}" if f.exit_code not in (None, "") else ""
        pod = f" pod {f.pod}" if f.pod else ""
        typer.echo(f"failed: {f.node} ({f.section} {f.stage}, {f.phase}{code}){pod}: {f.message}")
    if rs.report:
        label = "report" if rs.summarized else "partial report"
        typer.echo(f"{label}: {rs.report}")


def _status_of(k: Any, wf: dict, store: Optional[str]) -> Any:
    from lever.platform.runs import run_status

    rs = run_status(wf)
    _name_failed_pods(k, rs)
    return _with_report(rs, store)


def _render_table(rs: Any) -> Any:
    from rich.table import Table

    from lever.platform.runs import format_duration, duration_s

    t = Table(title=f"{rs.name} ({rs.plan}, run {rs.run_id}): {rs.phase}, "
                    f"{format_duration(duration_s(rs.started, rs.finished))}", title_justify="left")
    for col in ("stage", "phase", "units", "retries"):
        t.add_column(col)
    for p in rs.stages:
        if p.phase == "Pending":
            continue
        who = "baseline " if p.section == "baseline" else ""
        t.add_row(who + p.stage, p.phase, f"{p.done}/{'?' if p.total is None else p.total}", str(p.retries or ""))
    return t


def _watch(k: Any, wf: dict, store: Optional[str], as_json: bool) -> Any:
    """Follow the run with a Kubernetes watch until it finishes; print stage changes as they come
    (a live table on a terminal, one line per change otherwise, one JSON object per state with --json)."""
    interactive = sys.stdout.isatty() and not as_json
    last: dict[str, str] = {}
    live = None
    if interactive:
        from rich.live import Live

        live = Live(auto_refresh=False)
        live.start()

    def show(obj: dict) -> Any:
        rs = _run_status(obj)
        if rs.done:
            _name_failed_pods(k, rs)
        _with_report(rs, store)
        if as_json:
            typer.echo(json.dumps(rs.to_json()))
        elif live is not None:
            live.update(_render_table(rs), refresh=True)
        else:
            _print_status(rs, last)
        return rs

    try:
        if not as_json and live is None:
            rs0 = _run_status(wf)
            typer.echo(f"watching {rs0.name} (plan {rs0.plan}, run {rs0.run_id}) in namespace {k.namespace}")
        rs = show(wf)
        while not rs.done:
            rv = wf["metadata"].get("resourceVersion", "")
            for obj in k.watch_workflow(rs.name, rv):
                wf = obj
                rs = show(obj)
                if rs.done:
                    break
            else:  # the server closed the stream (timeout or 410): read again, watch again
                wf = k.get_workflow(rs.name)
                rs = show(wf)
    finally:
        if live is not None:
            live.stop()
    return rs


def _run_status(wf: dict) -> Any:
    from lever.platform.runs import run_status

    return run_status(wf)


@app.command("status")
def status_cmd(
    run: Optional[str] = typer.Argument(None, help="workflow name, run id or plan (its newest run); default: the newest run"),
    watch: bool = typer.Option(False, "--watch", "-w", help="follow the run live until it finishes"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (with --watch: one object per state)"),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help=NS_HELP),
    store: Optional[str] = typer.Option(None, "--store", help="artifact store for the report path (default: the run's 'store' parameter)"),
    kubeconfig: Optional[Path] = typer.Option(None, "--kubeconfig", help=KUBECONFIG_HELP),
    context: Optional[str] = typer.Option(None, "--context", help=CONTEXT_HELP),
) -> None:
    """A run's phase, each stage's progress (units done/total, retries), failed nodes with their pod
    and exit code, and the report's store path once summarize has run.  Exits 1 when the run failed."""
    from lever.platform import kube

    k = connect(namespace, kubeconfig, context)
    try:
        wf = resolve_run(k, run)
        if watch:
            rs = _watch(k, wf, store, as_json)
            if not as_json:
                typer.echo(f"{rs.name}: {rs.phase}" + (f" ({rs.message})" if rs.message else ""))
                _print_end(rs)
        else:
            rs = _status_of(k, wf, store)
            if as_json:
                typer.echo(json.dumps(rs.to_json(), indent=2))
            else:
                _print_status(rs)
                if rs.message:
                    typer.echo(f"message: {rs.message}")
                _print_end(rs)
    except kube.KubeError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    if rs.phase in ("Failed", "Error"):
        if not as_json:
            names = ", ".join(f.node for f in rs.failures) or "no failed node recorded"
            typer.echo(f"error: run {rs.name} {rs.phase.lower()}: {names}", err=True)
        raise SystemExit(1)


def _unit_ids(node: dict) -> list[str]:
    from lever.pipeline.graph import UNIT_ID_SEP
    from lever.platform.workflows import UNIT_PARAM

    for p in (node.get("inputs") or {}).get("parameters") or []:
        if p.get("name") == UNIT_PARAM:
            return [u.strip() for u in str(p.get("value", "")).split(UNIT_ID_SEP)]
    return []


@app.command("logs")
def logs_cmd(
    run: str = typer.Argument(..., help="workflow name or run id"),
    stage: Optional[str] = typer.Option(None, "--stage", "-s", help="only this stage's pods (e.g. generate-beams)"),
    unit: Optional[str] = typer.Option(None, "--unit", "-u", help="only the pod that ran this unit id (e.g. shard3-of16)"),
    tail: Optional[int] = typer.Option(None, "--tail", help="last N lines of each pod"),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help=NS_HELP),
    kubeconfig: Optional[Path] = typer.Option(None, "--kubeconfig", help=KUBECONFIG_HELP),
    context: Optional[str] = typer.Option(None, "--context", help=CONTEXT_HELP),
) -> None:
    """The ``main`` container logs of a run's pods that still exist (failed pods stay until the
    workflow's TTL; succeeded ones are removed by podGC right away)."""
    from lever.pipeline.graph import STAGES
    from lever.platform import kube
    from lever.platform.runs import STAGE_LABEL

    extra = ("summarize", "regress", "models-pull")
    if stage is not None and stage not in {s.name for s in STAGES} | set(extra):
        raise _fail(f"--stage {stage!r}: not a stage (have: {', '.join([s.name for s in STAGES] + ['regress', 'models-pull'])})")
    k = connect(namespace, kubeconfig, context)
    try:
        wf = resolve_run(k, run, plan_ok=False)
        name = wf["metadata"]["name"]
        selector = f"{kube.ARGO_WORKFLOW_LABEL}={name}" + (f",{STAGE_LABEL}={stage}" if stage else "")
        nodes = (wf.get("status") or {}).get("nodes") or {}
        pods = sorted(k.list_pods(selector), key=lambda p: str(p.metadata.creation_timestamp or ""))
        shown = 0
        for pod in pods:
            node = nodes.get((pod.metadata.annotations or {}).get(kube.ARGO_NODE_ID_ANNOTATION, ""), {})
            if unit is not None and unit not in _unit_ids(node):
                continue
            labels = pod.metadata.labels or {}
            units = ",".join(_unit_ids(node))
            typer.echo(f"==> {pod.metadata.name} ({labels.get(STAGE_LABEL, '?')}{' ' + units if units else ''}, "
                       f"{pod.status.phase if pod.status else '?'}) <==")
            sys.stdout.write(k.pod_log(pod.metadata.name, tail_lines=tail))
            sys.stdout.write("\n")
            shown += 1
    except kube.KubeError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    if not shown:
        what = " ".join(x for x in (f"stage {stage}" if stage else "", f"unit {unit}" if unit else "") if x)
        raise _fail(f"no pods of {name}{' for ' + what if what else ''} in namespace {k.namespace} "
                    f"(succeeded pods are deleted by podGC; their logs are in Argo's log archive)", 1)


def _average_diff(wf: dict, store: Optional[str]) -> str:
    from lever.platform.runs import run_status

    rs = run_status(wf)
    if not rs.summarized:
        return "-"
    try:
        st, key = report_location(rs.parameters, rs.run_id, partial=False, store=store)
        data = json.loads((st.open(key) / "report.json").read_text())
    except Exception as exc:  # noqa: BLE001 - one unreadable report must not hide the list
        typer.echo(f"warning: {rs.name}: report not readable ({exc})", err=True)
        return "?"
    diff = data.get("average_diff")
    return "-" if diff is None else f"{diff:+.2f}"


@app.command("runs")
def runs_cmd(
    plan: Optional[str] = typer.Option(None, "--plan", help="only runs of this plan"),
    limit: int = typer.Option(20, "--limit", help="newest N runs"),
    reports: bool = typer.Option(True, "--reports/--no-reports", help="read finished runs' average diff vs the baseline from their report"),
    store: Optional[str] = typer.Option(None, "--store", help="artifact store (default: each run's 'store' parameter)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help=NS_HELP),
    kubeconfig: Optional[Path] = typer.Option(None, "--kubeconfig", help=KUBECONFIG_HELP),
    context: Optional[str] = typer.Option(None, "--context", help=CONTEXT_HELP),
) -> None:
    """Recent Lever runs: phase, start, duration and, once finished, the average accuracy
    difference vs the baseline (points) read from the report."""
    from lever.platform import kube
    from lever.platform.runs import PART_OF_SELECTOR, PLAN_LABEL, duration_s, format_duration, parameters, run_id

    if plan is not None and not _LABEL_VALUE.match(plan):
        raise _fail(f"--plan {plan!r}: not a plan name")
    k = connect(namespace, kubeconfig, context)
    selector = PART_OF_SELECTOR + (f",{PLAN_LABEL}={plan}" if plan else "")
    try:
        items = k.list_workflows(selector)
    except kube.KubeError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    items.sort(key=lambda w: w["metadata"].get("creationTimestamp") or "", reverse=True)
    rows = []
    for wf in items[:limit]:
        status, params = wf.get("status") or {}, parameters(wf)
        rows.append({
            "name": wf["metadata"]["name"],
            "plan": params.get("plan") or (wf["metadata"].get("labels") or {}).get(PLAN_LABEL, ""),
            "run_id": run_id(wf, params),
            "phase": status.get("phase") or "Pending",
            "started": status.get("startedAt"),
            "duration_s": duration_s(status.get("startedAt"), status.get("finishedAt")),
            "average_diff": _average_diff(wf, store) if reports and status.get("phase") == "Succeeded" else "-",
        })
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no Lever runs in namespace {k.namespace}" + (f" for plan {plan}" if plan else ""))
        return
    head = f"{'NAME':<28} {'PLAN':<10} {'PHASE':<10} {'STARTED':<21} {'DURATION':<9} AVG DIFF"
    typer.echo(head)
    for r in rows:
        typer.echo(f"{r['name']:<28} {r['plan']:<10} {r['phase']:<10} {r['started'] or '-':<21} "
                   f"{format_duration(r['duration_s']):<9} {r['average_diff']}")


@app.command("delete")
def delete_cmd(
    run: str = typer.Argument(..., help="workflow name or run id"),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help=NS_HELP),
    kubeconfig: Optional[Path] = typer.Option(None, "--kubeconfig", help=KUBECONFIG_HELP),
    context: Optional[str] = typer.Option(None, "--context", help=CONTEXT_HELP),
) -> None:
    """Delete a run's Workflow (stopping it if it runs) and its pods.  Artifacts in the store stay."""
    from lever.platform import kube
    from lever.platform.runs import PART_OF_SELECTOR

    k = connect(namespace, kubeconfig, context)
    try:
        wf = resolve_run(k, run, plan_ok=False)
        name = wf["metadata"]["name"]
        key, _, value = PART_OF_SELECTOR.partition("=")
        if (wf["metadata"].get("labels") or {}).get(key) != value:
            raise _fail(f"workflow {name} is not a Lever run (no {PART_OF_SELECTOR} label); use kubectl or argo")
        k.delete_workflow(name)
    except kube.KubeError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    typer.echo(f"deleted {name} (namespace {k.namespace})")


def fetch_report(run: str, dest: Path, *, namespace: Optional[str], store: Optional[str],
                 kubeconfig: Optional[Path] = None, context: Optional[str] = None) -> Path:
    """Copy a run's report (report.md, report.json, plots/) from the store into ``dest``."""
    from lever.storage.store import MANIFEST, CorruptArtifact, StoreError
    from lever.platform import kube
    from lever.platform.runs import run_status

    k = connect(namespace, kubeconfig, context)
    try:
        rs = run_status(resolve_run(k, run, plan_ok=False))
    except kube.KubeError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    if not (rs.summarized or rs.partial_summarized):
        raise _fail(f"run {rs.name} ({rs.phase}) has no report yet: summarize has not run")
    try:
        st, key = report_location(rs.parameters, rs.run_id, partial=not rs.summarized, store=store)
    except ValueError as exc:
        raise _fail(f"run {rs.name}: {exc}") from None
    try:
        src = st.open(key)
    except KeyError:
        raise _fail(f"run {rs.name}: no report at {st.location(key)} (another store? pass --store)") from None
    except (CorruptArtifact, StoreError) as exc:
        raise _fail(f"run {rs.name}: report at {st.location(key)} unusable: {exc}", 1) from None
    dest.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name == MANIFEST:
            continue
        target = dest / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    typer.echo(f"{'report' if rs.summarized else 'partial report'} of {rs.name} from {st.location(key)}", err=True)
    return dest
