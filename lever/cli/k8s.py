"""CLI commands: k8s (see the module that implements them)."""

from lever.cli.app import app  # noqa: F401
