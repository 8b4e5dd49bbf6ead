"""The typer application object shared by the CLI modules (each module adds its commands)."""

import typer

app = typer.Typer(
    name="lever",
    help="Train and evaluate in-context demonstration selectors; run plans locally or on Argo.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
plan_app = typer.Typer(help="Inspect plans.", no_args_is_help=True)
app.add_typer(plan_app, name="plan")
