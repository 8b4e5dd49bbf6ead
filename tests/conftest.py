"""Shared fixtures.  Heavy fixtures (tiny models, synthetic data) are session-scoped so the whole
suite builds them once."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared():
    """The shared/ folder with the official schemas (``$LEVER_SHARED_DIR`` or found walking up).

    Skipped on a developer machine without it; failed under CI (``CI`` set), where shared/ is
    always laid beside the clone, so a lost schema can never pass as green."""
    import manifest_validation as validation

    found = validation.find_shared_dir()
    if found is None:
        reason = "no shared/schemas folder above the repository and LEVER_SHARED_DIR unset"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set: the official schemas must be validated)")
        pytest.skip(reason)
    return found


@pytest.fixture()
def fake_log(tmp_path, monkeypatch):
    """Where the fake stage functions (tests/test_runner_fakes.py) log each call, one line per
    stage entry, so a test can count what was built."""
    path = tmp_path / "calls.log"
    monkeypatch.setenv("LEVER_FAKE_LOG", str(path))
    monkeypatch.delenv("LEVER_FAKE_FAIL", raising=False)
    return path
