"""CLI commands: validate (see the module that implements them)."""

from lever.cli.app import app  # noqa: F401
