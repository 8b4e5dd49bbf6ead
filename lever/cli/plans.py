"""``lever plans``, ``lever plan show`` and ``lever plan fields``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lever.cli.app import app, plan_app


@app.command("plans")
def plans_cmd() -> None:
    """List every shipped plan with its one-line description."""
    from lever.config import list_plans, load_plan

    for name in list_plans():
        cfg = load_plan(name)
        mark = " (recommended)" if cfg.recommended else ""
        typer.echo(f"{name:<10} {cfg.description}{mark}")


@plan_app.command("show")
def plan_show(
    name: str = typer.Argument(..., help="plan name or path to a plan YAML"),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="tiny | cluster"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. grpo.kl_beta=0.1"),
) -> None:
    """Print the fully resolved plan as YAML."""
    from lever.config import load_plan, plan_to_yaml

    typer.echo(plan_to_yaml(load_plan(name, profile, set_)), nl=False)


@plan_app.command("fields")
def plan_fields(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the page to FILE instead of stdout"),
) -> None:
    """Print the reference of every plan and campaign field (type, default, bounds, description):
    the page committed as docs/config.md."""
    from lever.io import atomic_write_text

    text = config_reference()
    if out is None:
        typer.echo(text, nl=False)
        return
    atomic_write_text(out, text)
    typer.echo(f"wrote {out}", err=True)


def config_reference() -> str:
    """The Markdown reference of every plan and campaign field (here, above both schemas: the
    config package must not import the campaign package)."""
    from lever.campaign.schema import CampaignConfig
    from lever.config.reference import REGENERATE, field_table, section_blocks
    from lever.config.schema import PlanConfig

    lines = [
        "# Configuration reference",
        "",
        f"Generated from `lever/config/schema.py` and `lever/campaign/schema.py` by `{REGENERATE}`;",
        "do not edit by hand (`tests/test_config_reference.py` fails when this page and the schema differ).",
        "",
        "A plan YAML (`lever/config/presets/`) sets any of these fields; `defaults.yaml` restates the",
        "defaults, a plan is a diff against its `extends` parent, and `--set section.field=value` overrides",
        "one field on the command line (`lever plan show PLAN` prints the resolved result). Unknown keys are",
        "errors. \"allowed\" lists the bounds the loader enforces.",
        "",
        "## Plan: top level",
        "",
        *field_table(PlanConfig, ""),
        *section_blocks(PlanConfig, "", 3),
        "",
        "## Campaign file",
        "",
        "A campaign YAML (`campaigns/`, `lever campaign run`): which plans and sweeps run against which",
        "baseline (docs/campaigns.md).",
        "",
        *field_table(CampaignConfig, ""),
        *section_blocks(CampaignConfig, "", 3),
        "",
    ]
    return "\n".join(lines)
