"""``lever stage``, ``lever run``, ``lever train``, ``lever report``, ``lever compare``.

``lever stage NAME --plan P --store S [--unit k=v ... | --unit-id ID | --shard i]`` is the single
entry point both executors share: the local runner calls the same code in-process, and each Argo
container runs exactly this command.  ``--list-units`` prints only a JSON list of unit ids on
stdout (Argo's ``withParam``); every log line goes to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from lever.cli.app import app

PLAN_HELP = "plan name (see `lever plans`) or path to a plan YAML"
STORE_HELP = "artifact store: a directory or s3://bucket/prefix (default $LEVER_STORE or ./lever-store)"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lever").setLevel(logging.DEBUG if verbose else logging.INFO)


def _open(store: Optional[str]):
    from lever.errors import StageError
    from lever.storage.backends import open_store

    try:
        return open_store(store)
    except ValueError as exc:
        raise StageError(f"--store: {exc}") from None


def _pipeline(plan: str, profile: Optional[str], set_: list[str], store: Optional[str], run_id: Optional[str],
              with_baseline: bool = True):
    from lever.config import load_plan
    from lever.pipeline.runner import Pipeline, load_baseline

    cfg = load_plan(plan, profile, set_)
    base = load_baseline(cfg, profile, set_) if with_baseline else None
    return Pipeline(cfg, _open(store), baseline=base, run_id=run_id)


OVERRIDES_HELP = "JSON list of KEY=VALUE overrides (the Argo 'overrides' parameter), applied after --set"
ROLE_HELP = ("plan | baseline: as 'baseline' (the pipeline run as another plan's baseline) only the overrides "
             "a baseline shares are applied, as `lever run` does")


def _all_overrides(set_: list[str], overrides: str, role: str) -> list[str]:
    """--set plus the --overrides JSON list; for ``role`` baseline only what a baseline shares."""
    from lever.config.loader import PlanError, parse_overrides
    from lever.pipeline.runner import baseline_overrides

    out = [*set_, *parse_overrides(overrides)]
    if role not in ("plan", "baseline"):
        raise PlanError(f"--overrides-role must be plan or baseline, got {role!r}")
    return baseline_overrides(out) if role == "baseline" else out


def _parse_units(specs: list[str]) -> dict[str, str]:
    from lever.errors import StageError

    out = {}
    for spec in specs:
        for part in spec.split(","):
            if "=" not in part:
                raise StageError(f"--unit {spec!r}: expected KEY=VALUE (e.g. --unit shot=2 --unit shard=0)")
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _select(pipe, name: str, unit_id: Optional[str], filters: dict[str, str]):
    """Units named by ``--unit-id`` (one id, or a pod's comma-joined group) and ``--unit`` filters."""
    from lever.pipeline.graph import UNIT_ID_SEP

    if unit_id is None or UNIT_ID_SEP not in unit_id:
        return pipe.select_units(name, unit_id, filters)
    return [u for uid in unit_id.split(UNIT_ID_SEP) for u in pipe.select_units(name, uid.strip(), filters)]


def _store_failure(exc: Exception) -> None:
    typer.echo(f"error: artifact store: {exc}", err=True)
    raise typer.Exit(1)


@app.command("stage")
def stage_cmd(
    name: str = typer.Argument(..., help="stage name (see graph.py), e.g. infer"),
    plan: str = typer.Option(..., "--plan", help=PLAN_HELP),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="tiny | cluster"),
    set_: list[str] = typer.Option([], "--set", help="config override KEY=VALUE (repeatable)"),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    unit: list[str] = typer.Option([], "--unit", help="unit filter KEY=VALUE, e.g. shot=2 (repeatable)"),
    overrides: str = typer.Option("", "--overrides", help=OVERRIDES_HELP),
    overrides_role: str = typer.Option("plan", "--overrides-role", help=ROLE_HELP),
    unit_id: Optional[str] = typer.Option(None, "--unit-id", help="exact unit id(s) as printed by --list-units "
                                          "(comma-separated: one pod's group, run in a row with one model load)"),
    shard: Optional[int] = typer.Option(None, "--shard", help="shorthand for --unit shard=I"),
    list_units: bool = typer.Option(False, "--list-units", help="print the units as a JSON list of pod groups "
                                    "(comma-joined unit ids; Argo's withParam) and exit"),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="groups telemetry and run records"),
    force: bool = typer.Option(False, "--force", help="rebuild even if the artifact exists"),
    fresh: bool = typer.Option(False, "--fresh", help="drop any staging left by a killed attempt"),
    partial: bool = typer.Option(False, "--partial", help="run on whatever inputs exist (summarize after a failure)"),
    jobs: int = typer.Option(1, "--jobs", "-j", help="worker processes for the selected units"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run one stage of a plan (all units, or the selected ones), skipping committed artifacts."""
    from lever.storage.store import StoreError

    _setup_logging(verbose)
    set_ = _all_overrides(set_, overrides, overrides_role)
    filters = _parse_units(unit)
    if shard is not None:
        filters["shard"] = str(shard)
    if list_units:
        from lever.config import load_plan
        from lever.pipeline.graph import UNIT_ID_SEP, pod_groups
        from lever.pipeline.graph import stage as get_stage

        cfg = load_plan(plan, profile, set_)
        try:
            st = get_stage(name)
        except KeyError as exc:
            from lever.errors import StageError

            raise StageError(str(exc.args[0])) from None
        typer.echo(json.dumps([UNIT_ID_SEP.join(u.id for u in g) for g in pod_groups(st, cfg)]))
        return
    try:
        pipe = _pipeline(plan, profile, set_, store, run_id)
        if partial:
            r = pipe.run_partial(name, unit=pipe.select_units(name, unit_id, filters)[0])
            results = [r]
        else:
            units = _select(pipe, name, unit_id, filters)
            results = pipe.run_stage(name, units, jobs=jobs, force=force, fresh=fresh)
    except StoreError as exc:
        _store_failure(exc)
        return
    for r in results:
        typer.echo(f"{r.stage} {r.unit}: {r.status} {r.location}", err=True)


@app.command("run")
def run_cmd(
    plan: str = typer.Argument(..., help=PLAN_HELP),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="tiny | cluster"),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    set_: list[str] = typer.Option([], "--set", help="config override KEY=VALUE (repeatable)"),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="parallel workers for fanned-out stages (default: cores, or GPUs)"),
    run_id: Optional[str] = typer.Option(None, "--run-id"),
    force: list[str] = typer.Option([], "--force", help="rebuild this stage even if cached (repeatable)"),
    fresh: bool = typer.Option(False, "--fresh", help="drop staging left by killed attempts"),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="do not build the baseline plan (report without comparison)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print each unit's key and cache status, run nothing"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a whole plan (and its baseline) in order, reusing every finished artifact; print the report path."""
    _run(plan, profile, store, set_, jobs, run_id, force, fresh, no_baseline, dry_run, verbose, only=None)


@app.command("train")
def train_cmd(
    plan: str = typer.Argument(..., help=PLAN_HELP),
    profile: Optional[str] = typer.Option(None, "--profile", "-p"),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    set_: list[str] = typer.Option([], "--set"),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j"),
    run_id: Optional[str] = typer.Option(None, "--run-id"),
    force: list[str] = typer.Option([], "--force"),
    fresh: bool = typer.Option(False, "--fresh"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the training stages (train-v2 .. convert), generating their inputs first if missing."""
    from lever.pipeline.graph import training_stages

    _run(plan, profile, store, set_, jobs, run_id, force, fresh, True, False, verbose, only=training_stages())


def _run(plan, profile, store, set_, jobs, run_id, force, fresh, no_baseline, dry_run, verbose, only) -> None:
    from rich.console import Console

    from lever.config import load_plan
    from lever.pipeline.runner import Pipeline, load_baseline, run_plan, stage_closure
    from lever.storage.store import StoreError

    _setup_logging(verbose)
    console = Console(stderr=True)
    cfg = load_plan(plan, profile, set_)
    base = None if no_baseline else load_baseline(cfg, profile, set_)
    st = _open(store)
    if dry_run:
        pipe = Pipeline(cfg, st, baseline=base)
        names = stage_closure(only) if only else [s.name for s in pipe.stages]
        for name in names:
            for u in pipe.select_units(name):
                typer.echo(f"{name:<18} {u.id:<40} {pipe.key(name, u)}  {pipe.status(name, u)}")
        return
    try:
        summary = run_plan(cfg, st, baseline=base, only=only, jobs=jobs, run_id=run_id, force=force, fresh=fresh,
                           console=console)
    except StoreError as exc:
        _store_failure(exc)
        return
    n_cached = sum(r.status == "cached" for r in summary.results)
    console.print(f"done in {summary.seconds:.1f}s: {n_cached}/{len(summary.results)} units cached, run {summary.run_id}")
    if summary.report:
        typer.echo(summary.report)
        if st.is_remote and summary.report_key:
            console.print(f"local copy: {st.local_path(summary.report_key, 'report.md')}")


@app.command("report")
def report_cmd(
    plan: str = typer.Argument(..., help=PLAN_HELP + "; with --fetch: a cluster run (workflow name or run id)"),
    profile: Optional[str] = typer.Option(None, "--profile", "-p"),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    set_: list[str] = typer.Option([], "--set"),
    run_id: Optional[str] = typer.Option(None, "--run-id"),
    partial: bool = typer.Option(True, "--partial/--strict", help="write a partial report (missing parts marked) when inputs are missing"),
    fail_on_regression: bool = typer.Option(False, "--fail-on-regression", help="exit 1 when the report flags a regression vs the baseline"),
    fetch: Optional[Path] = typer.Option(None, "--fetch", help="download the report (report.md, report.json, plots/) "
                                         "of the cluster run named by the argument into this directory"),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help="with --fetch: the run's namespace"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Write (or find) the plan's report from what the store holds and print its path; with
    ``--fetch DIR``, download a cluster run's report (found through its Workflow) into DIR."""
    from lever.storage.store import StoreError

    _setup_logging(verbose)
    if fetch is not None:
        from lever.cli.runs import fetch_report
        from lever.errors import StageError

        if set_ or profile or run_id:
            raise StageError("--fetch takes the run's own plan, profile and overrides; drop --set/--profile/--run-id")
        out = fetch_report(plan, fetch, namespace=namespace, store=store)
        typer.echo(out / "report.md")
        return
    try:
        pipe = _pipeline(plan, profile, set_, store, run_id)
        r = pipe.run_partial("summarize") if partial else pipe.run_unit("summarize", pipe.select_units("summarize")[0])
        report_dir = pipe.store.open(r.key)
    except StoreError as exc:
        _store_failure(exc)
        return
    typer.echo(pipe.store.location(r.key, "report.md"))
    from lever.versioning import upgrade

    data = upgrade(json.loads((report_dir / "report.json").read_text()), "report", str(report_dir / "report.json"))
    if data.get("partial"):
        typer.echo(f"partial report: {len(data.get('missing', []))} input unit(s) missing", err=True)
    reg = data.get("regression", {})
    if fail_on_regression and reg.get("available") is False:  # partial report / no baseline: say so, exit 0
        typer.echo(f"regression check: {reg.get('reason', 'verdict not available')}", err=True)
    if fail_on_regression and reg.get("detected"):
        typer.echo(f"regression: {reg.get('reason', '')}", err=True)
        raise typer.Exit(1)


@app.command("compare")
def compare_cmd(
    plans: list[str] = typer.Argument(..., help="plans to compare (rows)"),
    profile: Optional[str] = typer.Option(None, "--profile", "-p"),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    set_: list[str] = typer.Option([], "--set"),
    references: bool = typer.Option(True, "--references/--no-references", help="add the random/retrieval/v2 rows"),
    epochs: bool = typer.Option(True, "--epochs/--no-epochs", help="add a row per evaluated GRPO epoch (checkpoint.evaluate_epochs)"),
    markdown: bool = typer.Option(False, "--markdown", help="print a Markdown table instead of a rich one"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Multi-plan accuracy table: plans as rows, shots as columns, average; best marked."""
    from lever.config import load_plan
    from lever.campaign.compare import compare_plans, render_markdown, render_rich

    cfgs = [load_plan(p, profile, set_) for p in plans]
    table = compare_plans(cfgs, _open(store), references=references, epochs=epochs)
    if as_json:
        typer.echo(json.dumps(table, indent=2))
    elif markdown:
        typer.echo(render_markdown(table))
    else:
        from rich.console import Console

        Console().print(render_rich(table))
