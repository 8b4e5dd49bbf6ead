"""``lever`` command line.  Commands live in small modules by topic; this module wires them and
maps the errors a user can fix (bad plan, bad input) to exit code 2 with a one-paragraph message
instead of a traceback."""

from __future__ import annotations

import sys

from lever.cli.app import app
from lever.cli import plans as _plans  # noqa: F401  (registers commands)
from lever.cli import pipeline as _pipeline  # noqa: F401
from lever.cli import k8s as _k8s  # noqa: F401
from lever.cli import obs as _obs  # noqa: F401
from lever.cli import validate as _validate  # noqa: F401
from lever.cli import bench as _bench  # noqa: F401

def _user_errors() -> tuple[type[BaseException], ...]:
    from lever.config.loader import PlanError
    from lever.pipeline.context import StageError

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
    except Exception as exc:  # click usage errors arrive here with standalone_mode=False
        import click

        if isinstance(exc, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            sys.exit(130)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
