"""User-error types shared by every layer.

This module sits at the bottom of the package: domain code (data, models, selectors, rl,
sampling, ...) raises these errors and the pipeline, executors and CLI above it translate them
into exit code 2.  Keeping them here, and not in the pipeline, lets domain modules report bad
input without importing the layer that runs them.
"""

from __future__ import annotations


class StageError(Exception):
    """A stage refused its input or failed in a way the user must fix (exit code 2, never retried)."""
