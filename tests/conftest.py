"""Shared fixtures.  Heavy fixtures (tiny models, synthetic data) are session-scoped so the whole
suite builds them once."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
