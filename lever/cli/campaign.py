"""``lever campaign run|report|render|submit FILE``: many plans and sweeps as one job.

``run`` builds every member locally (shared units once, through the store) and writes the
leaderboard; ``report`` (re)writes the leaderboard from what the store holds; ``render`` /
``submit`` turn the campaign into one Argo Workflow (``--nightly``: the nightly CronWorkflow
running the campaign instead of plan5 vs baseline).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from lever.cli.app import app
from lever.cli.pipeline import STORE_HELP, _open, _setup_logging, _store_failure

campaign_app = typer.Typer(help="Run many plans and sweeps as one job, with one leaderboard.", no_args_is_help=True)
app.add_typer(campaign_app, name="campaign")

FILE_HELP = "campaign YAML (see campaigns/)"


def _summary_line(summary) -> str:
    return (f"{summary.unique} distinct units: {summary.built} built, {summary.reused} reused from the store; "
            f"{summary.shared} needed by two or more member runs (built once)")


@campaign_app.command("run")
def run_cmd(
    file: Path = typer.Argument(..., help=FILE_HELP),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="tiny | cluster"),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="parallel workers for fanned-out stages"),
    run_id: Optional[str] = typer.Option(None, "--run-id"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the members and what is cached, run nothing"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run every member (at every seed) against the baseline, sharing units; print the leaderboard path."""
    from rich.console import Console

    from lever.campaign.loader import load_and_resolve
    from lever.campaign.run import run_campaign
    from lever.storage.store import StoreError

    _setup_logging(verbose)
    console = Console(stderr=True)
    camp, runs = load_and_resolve(file, profile)
    st = _open(store)
    if dry_run:
        from lever.pipeline.runner import Pipeline, stage_closure

        seen: dict[str, str] = {}
        for m, seed, plan, base in runs:
            pipe = Pipeline(plan, st, baseline=base)
            bpipe = Pipeline(base, st)
            reads = stage_closure([n for s in pipe.stages if s.with_baseline for n in s.inputs])
            keys = list(dict.fromkeys([bpipe.key(n, u) for n in reads for u in bpipe.select_units(n)]
                                      + [pipe.key(s.name, u) for s in pipe.stages for u in pipe.select_units(s.name)]))
            new = [k for k in keys if k not in seen]
            cached = sum(1 for k in new if st.check(k) == [])
            for k in new:
                seen[k] = m.name
            typer.echo(f"{m.name}{f' seed {seed}' if seed is not None else ''}: {len(keys)} units with its baseline's, "
                       f"{len(keys) - len(new)} shared with earlier members, {len(new)} own ({cached} cached)")
        return
    try:
        summary = run_campaign(camp, runs, st, jobs=jobs, console=console, run_id=run_id)
    except StoreError as exc:
        _store_failure(exc)
        return
    for label, built, cached in summary.members:
        console.print(f"  {label}: built {built}, cached {cached}", highlight=False)
    console.print(f"campaign {camp.name} done in {summary.seconds:.1f}s: {_summary_line(summary)}", highlight=False)
    board = summary.board or {}
    console.print(f"best member: {board.get('best') or 'none significant after Holm adjustment'}"
                  + (f" ({summary.status} leaderboard: {', '.join(board.get('incomplete', []))} missing)"
                     if board.get("incomplete") else ""), highlight=False)
    if summary.leaderboard:
        typer.echo(summary.leaderboard)


@campaign_app.command("report")
def report_cmd(
    file: Path = typer.Argument(..., help=FILE_HELP),
    profile: Optional[str] = typer.Option(None, "--profile", "-p"),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    run_id: str = typer.Option("local", "--run-id", help="names a partial leaderboard"),
    as_json: bool = typer.Option(False, "--json", help="print leaderboard.json instead of its path"),
    fail_on_regression: bool = typer.Option(False, "--fail-on-regression/--no-fail-on-regression",
                                            help="exit 1 when a member is significantly worse than the baseline "
                                                 "after Holm's adjustment (by more than leaderboard.margin)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """(Re)write the leaderboard from the store (members not finished yet are listed as missing)."""
    from lever.campaign.loader import load_and_resolve
    from lever.campaign.report import write_leaderboard
    from lever.storage.store import StoreError

    _setup_logging(verbose)
    camp, runs = load_and_resolve(file, profile)
    st = _open(store)
    try:
        key, board, status = write_leaderboard(camp, runs, st, run_id=run_id)
    except StoreError as exc:
        _store_failure(exc)
        return
    if as_json:
        typer.echo(json.dumps(board, indent=2))
    else:
        typer.echo(st.location(key, "leaderboard.md"))
    if board.get("incomplete"):
        typer.echo(f"partial leaderboard: {len(board['incomplete'])} member(s) incomplete", err=True)
    if fail_on_regression and board.get("regressions"):
        typer.echo("regression: significantly worse than the baseline after Holm's adjustment: "
                   + ", ".join(board["regressions"]), err=True)
        raise SystemExit(1)


def _manifest(file: Path, profile: str, nightly: bool):
    from lever.campaign.loader import load_and_resolve
    from lever.platform import render
    from lever.platform.campaign import build_campaign_cron, build_campaign_workflow

    camp, runs = load_and_resolve(file, profile)
    build = build_campaign_cron if nightly else build_campaign_workflow
    return camp, build(camp, runs, render.cluster_platform(), profile)


@campaign_app.command("render")
def render_cmd(
    file: Path = typer.Argument(..., help=FILE_HELP),
    profile: str = typer.Option("cluster", "--profile", "-p", help="profile the pods run the members with"),
    nightly: bool = typer.Option(False, "--nightly", help="render the nightly CronWorkflow (lever-nightly) running "
                                 "this campaign instead of the default plan vs baseline"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write to FILE instead of stdout"),
) -> None:
    """Print the campaign's ONE Argo Workflow (or, with --nightly, its CronWorkflow)."""
    from lever.platform import render

    _, wf = _manifest(file, profile, nightly)
    text = render.to_yaml(wf)
    if output:
        render.write_atomic(output, text)
        typer.echo(f"wrote {output}", err=True)
    else:
        sys.stdout.write(text)


@campaign_app.command("submit")
def submit_cmd(
    file: Path = typer.Argument(..., help=FILE_HELP),
    profile: str = typer.Option("cluster", "--profile", "-p"),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n"),
    server: Optional[str] = typer.Option(None, "--server", help="Argo server URL (default $ARGO_SERVER)"),
) -> None:
    """Submit the campaign Workflow through the Argo server (the lever-pipeline template must be installed)."""
    from hera.workflows import WorkflowsService

    from lever.cli.k8s import ENV_INSECURE, ENV_NAMESPACE, ENV_SERVER, ENV_TOKEN, _fail
    from lever.platform import render

    host = server or os.environ.get(ENV_SERVER)
    if not host:
        raise _fail(f"set {ENV_SERVER} (e.g. https://argo.example.com:2746) or pass --server")
    if not host.startswith(("http://", "https://")):
        host = "https://" + host
    _, wf = _manifest(file, profile, False)
    ns = namespace or os.environ.get(ENV_NAMESPACE) or render.cluster_platform().namespace
    wf.namespace = ns
    wf.workflows_service = WorkflowsService(host=host, token=os.environ.get(ENV_TOKEN), namespace=ns,
                                            verify_ssl=os.environ.get(ENV_INSECURE, "").lower() not in ("1", "true", "yes"))
    try:
        created = wf.create()
    except Exception as exc:
        raise _fail(f"submission to {host} failed: {exc}") from None
    typer.echo(created.metadata.name)
    typer.echo(wf.workflows_service.get_workflow_link(created.metadata.name))
