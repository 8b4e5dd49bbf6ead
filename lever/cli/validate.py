"""``lever validate KIND FILE``: run a stage's input checks on one file and print every problem.

Exit 0 when valid, 2 when not (the exit code of every user-fixable error in Lever), so a CI job or
a pre-submit hook can gate on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lever.cli.app import app


@app.command("validate")
def validate_cmd(
    kind: str = typer.Argument(..., help="rl-data | plan | predictions | checkpoint"),
    file: Path = typer.Argument(..., help="the file (a checkpoint: its .safetensors, .json or common stem)"),
    plan: Optional[str] = typer.Option(None, "--plan", help="checkpoint: also compare its architecture with this plan's selector"),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="profile overlay for a plan (as `lever run --profile`) and for --plan"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the problems"),
) -> None:
    """Check FILE the way the stage that reads it would; print each problem with file, line, field."""
    from lever.validation import KINDS, validate

    if kind not in KINDS:
        typer.echo(f"error: unknown kind {kind!r}; kinds: {', '.join(KINDS)}", err=True)
        raise SystemExit(2)
    cfg = None
    if plan is not None:
        from lever.config import load_plan

        cfg = load_plan(plan, profile)
    problems = validate(kind, file, cfg, profile=profile)
    for p in problems:
        typer.echo(str(p))
    if problems:
        typer.echo(f"{file}: invalid {kind}: {len(problems)} problem(s)", err=True)
        raise SystemExit(2)
    if not quiet:
        typer.echo(f"{file}: valid {kind}", err=True)
