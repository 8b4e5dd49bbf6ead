"""LocalStore: atomic commit, manifests, verification, quarantine, persistent staging."""

from __future__ import annotations

import json
import os

import pytest

from lever.storage.backends import open_store
from lever.storage.store import MANIFEST, CorruptArtifact, LocalStore, StagingBusy, sha256_file


def _build(store: LocalStore, key: str, files: dict[str, bytes]) -> dict:
    with store.staging(key) as st:
        for rel, data in files.items():
            p = st.path / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        assert store.check(key) is None, "nothing is visible before commit"
        return store.commit(key, {"stage": "s", "unit": "all"})


def test_commit_writes_manifest_and_moves_atomically(tmp_path):
    store = LocalStore(tmp_path / "st")
    m = _build(store, "s/abc123", {"a.txt": b"hello", "sub/b.bin": b"\x00\x01"})
    final = tmp_path / "st" / "s" / "abc123"
    assert (final / MANIFEST).is_file()
    assert not (tmp_path / "st" / ".staging" / "s" / "abc123").exists()
    disk = json.loads((final / MANIFEST).read_text())
    assert disk == m
    assert disk["files"]["a.txt"] == {"sha256": sha256_file(final / "a.txt"), "size": 5}
    assert set(disk["files"]) == {"a.txt", "sub/b.bin"}
    for field in ("lever_version", "created", "git_commit", "stage", "unit", "key"):
        assert field in disk
    assert store.check("s/abc123") == []
    assert store.open("s/abc123") == final
    # the store interface: artifacts are already local, staging is already where workers see it
    assert not store.is_remote and store.local_path("s/abc123", "a.txt") == final / "a.txt"
    assert store.sync_staging("s/abc123") == 0


def test_corruption_is_detected_and_quarantined(tmp_path):
    store = LocalStore(tmp_path)
    _build(store, "s/k1", {"a.txt": b"hello"})
    assert store.check("s/k1") == []
    (tmp_path / "s" / "k1" / "a.txt").write_bytes(b"hellO")  # same size, different bytes
    fresh = LocalStore(tmp_path)  # no in-process memo
    problems = fresh.check("s/k1")
    assert problems and "sha256" in problems[0]
    with pytest.raises(CorruptArtifact):
        fresh.open("s/k1")
    where = fresh.quarantine("s/k1", "test")
    assert fresh.check("s/k1") is None
    assert json.loads((tmp_path / ".quarantine" / os.path.basename(where) / "_quarantine.json").read_text())["reason"] == "test"


def test_memo_notices_rewrites_in_same_process(tmp_path):
    store = LocalStore(tmp_path)
    _build(store, "s/k1", {"a.txt": b"hello"})
    assert store.check("s/k1") == []
    (tmp_path / "s" / "k1" / "a.txt").write_bytes(b"longer!")
    assert store.check("s/k1")  # size changed -> fingerprint changed -> re-verified


def test_extra_and_missing_files_are_problems(tmp_path):
    store = LocalStore(tmp_path)
    _build(store, "s/k1", {"a.txt": b"x", "b.txt": b"y"})
    (tmp_path / "s" / "k1" / "b.txt").unlink()
    (tmp_path / "s" / "k1" / "c.txt").write_text("intruder")
    problems = LocalStore(tmp_path).check("s/k1")
    assert any("b.txt: missing" in p for p in problems)
    assert any("c.txt: not in manifest" in p for p in problems)


def test_staging_survives_and_is_locked(tmp_path):
    store = LocalStore(tmp_path)
    with store.staging("s/k2") as st:
        (st.path / "partial.jsonl").write_text("1\n")
        with pytest.raises(StagingBusy):
            with LocalStore(tmp_path).staging("s/k2"):
                pass
    # a later attempt (a "restart") finds what the killed one wrote
    with store.staging("s/k2") as st:
        assert (st.path / "partial.jsonl").read_text() == "1\n"
    store.discard_staging("s/k2")
    with store.staging("s/k2") as st:
        assert not any(st.path.iterdir())


def test_bad_keys_and_urls(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(ValueError):
        store.staging("../evil")
    with pytest.raises(ValueError):
        open_store("gs://bucket/x")
    assert isinstance(open_store(str(tmp_path / "x")), LocalStore)


def test_put_get_json(tmp_path):
    store = LocalStore(tmp_path)
    store.put_json("runs/p/r1.json", {"a": 1})
    assert store.get_json("runs/p/r1.json") == {"a": 1}
    assert store.get_json("runs/p/none.json") is None
