"""S3Store against a real HTTP S3 server on loopback (moto server mode)."""

from __future__ import annotations

import json

import pytest

from lever.config import load_plan
from lever.pipeline.runner import Pipeline, load_baseline, run_plan
from lever.storage.backends import open_store
from lever.storage.s3 import S3Store
from lever.storage.store import CorruptArtifact
from s3_server import client, moto_s3
from test_runner_fakes import fake_stages, read_log

pytestmark = pytest.mark.integration


@pytest.fixture()
def s3(monkeypatch):
    with moto_s3(monkeypatch) as (endpoint, bucket):
        yield endpoint, bucket


def _names(endpoint, bucket, prefix=""):
    out = []
    for page in client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def test_commit_is_manifest_last_and_download_verified(s3, tmp_path):
    endpoint, bucket = s3
    store = open_store(f"s3://{bucket}/runs/x", cache_dir=str(tmp_path / "cache"))
    assert isinstance(store, S3Store)
    with store.staging("stage/abc") as st:
        (st.path / "a.txt").write_text("hello")
        (st.path / "d").mkdir()
        (st.path / "d" / "b.bin").write_bytes(b"\x00" * 1000)
        assert store.check("stage/abc") is None
    m = store.commit("stage/abc", {"stage": "stage", "unit": "all"})
    names = _names(endpoint, bucket)
    assert set(names) == {"runs/x/stage/abc/a.txt", "runs/x/stage/abc/d/b.bin", "runs/x/stage/abc/_manifest.json"}
    assert store.check("stage/abc") == []
    # a second machine: empty cache, downloads and verifies
    other = S3Store(bucket, "runs/x", cache_dir=tmp_path / "cache2")
    local = other.open("stage/abc")
    assert (local / "a.txt").read_text() == "hello"
    assert json.loads((local / "_manifest.json").read_text())["files"] == m["files"]
    # the store interface: the CLI's "local copy" line and the runner's staging snapshots
    assert other.is_remote and other.local_path("stage/abc", "a.txt") == local / "a.txt"
    # same-size tampering in the bucket: the size check passes, the download check does not
    client(endpoint).put_object(Bucket=bucket, Key="runs/x/stage/abc/a.txt", Body=b"hellO")
    third = S3Store(bucket, "runs/x", cache_dir=tmp_path / "cache3")
    assert third.check("stage/abc") == []
    with pytest.raises(CorruptArtifact, match="sha256"):
        third.open("stage/abc")
    where = third.quarantine("stage/abc", "test")
    assert where.startswith(f"s3://{bucket}/runs/x/.quarantine/")
    assert third.check("stage/abc") is None
    assert not [n for n in _names(endpoint, bucket, "runs/x/stage/") if n.startswith("runs/x/stage/abc")]


def test_staging_snapshot_resumes_on_another_machine(s3, tmp_path):
    endpoint, bucket = s3
    a = S3Store(bucket, "p", cache_dir=tmp_path / "a")
    with a.staging("infer/k1") as st:
        (st.path / "predictions.jsonl").write_text('{"query_index": 0}\n')
    assert a.sync_staging("infer/k1") == 1
    b = S3Store(bucket, "p", cache_dir=tmp_path / "b")
    with b.staging("infer/k1") as st:
        assert (st.path / "predictions.jsonl").read_text() == '{"query_index": 0}\n'
    b.commit("infer/k1", {})
    assert not _names(endpoint, bucket, "p/.staging/"), "commit removes the snapshot"


def test_fake_pipeline_on_s3(s3, tmp_path, monkeypatch):
    endpoint, bucket = s3
    monkeypatch.setenv("LEVER_FAKE_LOG", str(tmp_path / "calls.log"))
    small = ["infer.num_samples=12", "infer.shards=2", "infer.shots=[1,2]", "report.bootstrap_samples=100"]
    plan = load_plan("plan1", "tiny", small)
    base = load_baseline(plan, "tiny", small)
    store = S3Store(bucket, "lever", cache_dir=tmp_path / "cache")
    s = run_plan(plan, store, baseline=base, stages=fake_stages(), jobs=2)
    assert s.report.startswith(f"s3://{bucket}/lever/summarize/") and s.report.endswith("/report.md")
    names = _names(endpoint, bucket, "lever/")
    assert s.report[len(f"s3://{bucket}/"):] in names
    manifests = [n for n in names if n.endswith("/_manifest.json")]
    pipe = Pipeline(plan, store, stages=fake_stages(), baseline=base)
    n_units = sum(len(v) for v in pipe.keys.units.values())
    assert len(manifests) >= n_units
    m = json.loads(client(endpoint).get_object(Bucket=bucket, Key=manifests[0])["Body"].read())
    assert {"files", "lever_version", "git_commit", "created", "stage", "unit"} <= set(m)
    # everything cached on a fresh machine (empty cache)
    n_calls = len(read_log(tmp_path / "calls.log"))
    s2 = run_plan(plan, S3Store(bucket, "lever", cache_dir=tmp_path / "cache-b"), baseline=base,
                  stages=fake_stages(), jobs=1)
    assert {r.status for r in s2.results} == {"cached"}
    assert len(read_log(tmp_path / "calls.log")) == n_calls
    # no credential anywhere in what the run wrote
    for n in names:
        body = client(endpoint).get_object(Bucket=bucket, Key=n)["Body"].read()
        assert b"lever-test-secret" not in body and b"AKIALEVERTEST" not in body


def test_killed_unit_resumes_on_another_machine(s3, tmp_path, monkeypatch):
    """A failing unit leaves a staging snapshot in the bucket; a runner with an empty cache (another
    node) restores it and the resumable fake infer only adds the missing rows."""
    endpoint, bucket = s3
    monkeypatch.setenv("LEVER_FAKE_LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("LEVER_STAGING_SYNC_S", "30")
    small = ["infer.num_samples=8", "infer.shards=1", "infer.shots=[1]", "infer.baselines=[random]"]
    plan = load_plan("baseline", "tiny", small)
    a = S3Store(bucket, "lever", cache_dir=tmp_path / "node-a")
    run_plan(plan, a, stages=fake_stages(), jobs=1, only=["export-embeddings"])
    pipe = Pipeline(plan, a, stages=fake_stages())
    unit = pipe.select_units("infer", filters={"variant": "random"})[0]
    monkeypatch.setenv("LEVER_FAKE_FAIL", f"infer:{unit.id}")
    with pytest.raises(RuntimeError, match="injected"):
        pipe.run_unit("infer", unit)
    key = pipe.key("infer", unit)
    snap = f"lever/.staging/{key}/predictions.jsonl"
    assert snap in _names(endpoint, bucket, "lever/.staging/")
    # keep 3 of the snapshot's rows, marked, to see exactly what the other node resumes from
    rows = [json.loads(x) for x in client(endpoint).get_object(Bucket=bucket, Key=snap)["Body"].read().splitlines()]
    kept = "".join(json.dumps(dict(x, from_snapshot=True)) + "\n" for x in rows[:3])
    client(endpoint).put_object(Bucket=bucket, Key=snap, Body=kept.encode())
    monkeypatch.delenv("LEVER_FAKE_FAIL")
    b = S3Store(bucket, "lever", cache_dir=tmp_path / "node-b")
    r = Pipeline(plan, b, stages=fake_stages()).run_unit("infer", unit)
    rows = [json.loads(x) for x in (b.open(r.key) / "predictions.jsonl").read_text().splitlines()]
    assert sorted(x["query_index"] for x in rows) == list(range(8))
    assert [x["query_index"] for x in rows if x.get("from_snapshot")] == [0, 1, 2]
    assert not _names(endpoint, bucket, "lever/.staging/")
