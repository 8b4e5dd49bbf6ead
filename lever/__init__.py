"""Lever: train and evaluate in-context demonstration selectors for vision-language models."""

__version__ = "0.1.0"
