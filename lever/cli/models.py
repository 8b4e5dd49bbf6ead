"""``lever models pull`` and ``lever models where``: models as provisioned artifacts.

``pull`` is the one step that may touch the network: it snapshots each pretrained model a plan
uses, at its pinned revision, into the models root (a model volume or an S3 prefix).  Stage pods
then only read (``HF_HUB_OFFLINE=1``); ``where`` shows what a stage would load, or why it cannot.
"""

from __future__ import annotations

from typing import Optional

import typer

from lever.cli.app import app

models_app = typer.Typer(help="Provision pretrained models (one-time, before running plans on a cluster).",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


def _refs(plan: str, profile: Optional[str], set_: list[str]):
    from lever.config import load_plan
    from lever.models.provision import plan_models

    cfg = load_plan(plan, profile, set_)
    return cfg, plan_models(cfg)


@models_app.command("pull")
def pull_cmd(
    plan: str = typer.Option("plan5", "--plan", help="plan whose models to provision"),
    profile: Optional[str] = typer.Option("cluster", "--profile", "-p"),
    set_: list[str] = typer.Option([], "--set", help="config override KEY=VALUE (repeatable)"),
    overrides: str = typer.Option("", "--overrides", help="JSON list of KEY=VALUE overrides (the Argo 'overrides' parameter)"),
    to: Optional[str] = typer.Option(None, "--to", help="models root: a directory or s3://bucket/prefix "
                                     "(default: the plan's models.root)"),
    lvlm_from: Optional[str] = typer.Option(None, "--lvlm-from", help="copy the LVLM from this local directory "
                                            "(hub layout) instead of downloading it"),
    encoder_from: Optional[str] = typer.Option(None, "--encoder-from", help="copy the encoder from this local "
                                               "directory instead of downloading it"),
    force: bool = typer.Option(False, "--force", help="replace snapshots that are already there"),
) -> None:
    """Snapshot the plan's LVLM and encoder at their pinned revisions into the models root."""
    from lever.models.provision import pull
    from lever.errors import StageError

    from lever.config.loader import parse_overrides

    cfg, refs = _refs(plan, profile, [*set_, *parse_overrides(overrides)])
    dest = to or cfg.models.root
    if not dest:
        raise StageError("no models root: pass --to DIR|s3://... or set models.root")
    if not refs:
        typer.echo(f"plan {cfg.name} (profile {profile}) uses no pretrained model: nothing to pull", err=True)
        return
    sources = {"lvlm": lvlm_from, "encoder": encoder_from}
    for ref in refs:
        where = pull(ref, dest, source=sources[ref.field], force=force, echo=lambda m: typer.echo(m, err=True))
        typer.echo(where)


@models_app.command("where")
def where_cmd(
    plan: str = typer.Option("plan5", "--plan"),
    profile: Optional[str] = typer.Option("cluster", "--profile", "-p"),
    set_: list[str] = typer.Option([], "--set", help="config override KEY=VALUE (repeatable)"),
) -> None:
    """Print the directory each pretrained model of the plan loads from (exit 2 if not provisioned)."""
    from lever.models.provision import resolve

    cfg, refs = _refs(plan, profile, set_)
    for ref in refs:
        typer.echo(f"{ref.field}: {ref.name}@{ref.revision or '-'} -> {resolve(ref, cfg.models.root)}")
