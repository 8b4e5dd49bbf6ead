"""``lever`` command line.  Commands live in small modules by topic; this module wires them and
maps the errors a user can fix (bad plan, bad input) to exit code 2 with a one-paragraph message
instead of a traceback."""

from __future__ import annotations

import sys

from lever.cli.app import app
from lever.cli import plans as _plans  # noqa: F401  (registers commands)
from lever.cli import pipeline as _pipeline  # noqa: F401
from lever.cli import k8s as _k8s  # noqa: F401
from lever.cli import runs as _runs  # noqa: F401
from lever.cli import obs as _obs  # noqa: F401
from lever.cli import validate as _validate  # noqa: F401
from lever.cli import bench as _bench  # noqa: F401
from lever.cli import store as _store  # noqa: F401
from lever.cli import models as _models  # noqa: F401
from lever.cli import campaign as _campaign  # noqa: F401

def _user_errors() -> tuple[type[BaseException], ...]:
    from lever.config.loader import PlanError
    from lever.errors import StageError

    return (PlanError, StageError)


def main(argv: list[str] | None = None) -> None:
    try:
        # with standalone_mode=False click *returns* the code of a typer.Exit instead of exiting
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except SystemExit:
        raise
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # usage errors arrive here with standalone_mode=False
        # typer 0.29 vendors click as typer._click; older typer uses click itself
        try:
            from typer import _click as click_mod  # type: ignore[attr-defined]
        except ImportError:  # pragma: no cover - older typer
            import click as click_mod
        if type(exc).__name__ == "Abort":  # Ctrl-C at a prompt
            print("aborted", file=sys.stderr)
            sys.exit(130)
        if isinstance(exc, click_mod.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code if exc.exit_code else 2)
        raise

if __name__ == "__main__":
    main()
