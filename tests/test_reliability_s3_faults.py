"""S3 storage faults, injected on loopback between boto3 and a real S3 endpoint (moto server).

What must hold: with throttling (503 SlowDown), 5xx, dropped connections, truncated and
bit-flipped response bodies, the store's operations either complete with byte-identical artifacts
or fail with a clear StoreError / CorruptArtifact -- and a failed operation never leaves a
committed (visible) artifact that is incomplete, in the bucket or in the local cache.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from lever.storage.s3 import S3Store
from lever.storage.store import CorruptArtifact, StoreError
from s3_faults import Fault
from s3_server import moto_s3_behind_proxy

pytestmark = pytest.mark.integration

MB = 1024 * 1024
BIG = 13 * MB  # > the 6 MB threshold set below: 3 parts of >= 5 MB (S3's minimum part size)


@pytest.fixture()
def s3(monkeypatch):
    """moto server + a bucket + a fault proxy in front; the environment points Lever at the proxy."""
    env = {"LEVER_S3_MULTIPART_THRESHOLD": str(6 * MB), "LEVER_S3_MAX_ATTEMPTS": "6"}
    with moto_s3_behind_proxy(monkeypatch, env, seed=7) as (_, proxy, direct, bucket):
        yield proxy, direct, bucket


def _artifact(store: S3Store, key: str, payload: bytes) -> dict:
    with store.staging(key) as st:
        (st.path / "big.bin").write_bytes(payload)
        (st.path / "meta.json").write_text(json.dumps({"n": len(payload)}))
        (st.path / "rows.jsonl").write_text("".join(json.dumps({"i": i}) + "\n" for i in range(200)))
    return store.commit(key, {"stage": "test", "unit": "all"})


def _fresh(bucket: str, tmp_path) -> S3Store:
    return S3Store(bucket, "p", cache_dir=tmp_path / f"cache-{uuid.uuid4().hex[:6]}")


def _committed(direct, bucket: str, key: str) -> bool:
    res = direct.list_objects_v2(Bucket=bucket, Prefix=f"p/{key}/_manifest.json")
    return res.get("KeyCount", 0) > 0


def test_multipart_upload_really_happens_and_round_trips(s3, tmp_path):
    proxy, direct, bucket = s3
    payload = os.urandom(BIG)
    m = _artifact(_fresh(bucket, tmp_path), "stage/k1", payload)
    assert proxy.requests("POST", "?uploads"), "no CreateMultipartUpload: multipart was not used"
    assert len(proxy.requests("PUT", "partNumber=")) >= 3
    local = _fresh(bucket, tmp_path).open("stage/k1")
    assert (local / "big.bin").read_bytes() == payload
    assert json.loads((local / "_manifest.json").read_text())["files"] == m["files"]


TRANSIENT = {
    "throttled": [Fault("503", times=3)],
    "server-errors": [Fault("500", times=3)],
    "dropped-connections": [Fault("drop", times=3)],
    "truncated-bodies": [Fault("truncate", method="GET", match="big.bin", times=2),
                         Fault("truncate", method="GET", match="_manifest.json", times=1)],
    "corrupted-bodies": [Fault("corrupt", method="GET", match="meta.json", times=1),
                         Fault("corrupt", method="GET", match="_manifest.json", times=1)],
    "multipart-parts": [Fault("503", method="PUT", match="partNumber=2", times=2),
                        Fault("drop", method="PUT", match="partNumber=3", times=1),
                        Fault("500", method="POST", match="uploadId=", times=1)],  # CompleteMultipartUpload
    "mixed-random": [Fault("503", prob=0.15, limit=3), Fault("drop", prob=0.1, limit=3),
                     Fault("truncate", method="GET", prob=0.15, limit=3), Fault("corrupt", method="GET", prob=0.15, limit=3)],
}


@pytest.mark.parametrize("name", sorted(TRANSIENT))
def test_transient_faults_give_identical_artifacts(s3, tmp_path, name):
    proxy, direct, bucket = s3
    payload = os.urandom(BIG)
    proxy.set_faults(TRANSIENT[name])
    m = _artifact(_fresh(bucket, tmp_path), "stage/k1", payload)
    assert _committed(direct, bucket, "stage/k1")
    # what is in the bucket is exactly what was staged (read behind the proxy's back)
    assert direct.get_object(Bucket=bucket, Key="p/stage/k1/big.bin")["Body"].read() == payload
    uploads_hit = sum(proxy.injected.values())
    proxy.set_faults(TRANSIENT[name])  # the same rules, fresh counters, for the download side
    other = _fresh(bucket, tmp_path)
    assert other.check("stage/k1") == []
    local = other.open("stage/k1")
    assert (local / "big.bin").read_bytes() == payload
    assert json.loads((local / "_manifest.json").read_text())["files"] == m["files"]
    assert sum(proxy.injected.values()) > 0, "no fault was injected: the test proved nothing"
    if name not in ("truncated-bodies", "corrupted-bodies"):  # GET-only rules have nothing to hit on upload
        assert uploads_hit > 0, "no fault hit the upload"


def test_persistent_corruption_fails_clearly_and_nothing_corrupt_is_visible(s3, tmp_path):
    proxy, direct, bucket = s3
    payload = os.urandom(2 * MB)
    _artifact(_fresh(bucket, tmp_path), "stage/k1", payload)
    proxy.set_faults([Fault("corrupt", method="GET", match="big.bin", prob=1.0)])
    other = _fresh(bucket, tmp_path)
    with pytest.raises((CorruptArtifact, StoreError)) as err:
        other.open("stage/k1")
    assert "big.bin" in str(err.value)
    assert not other.local_path("stage/k1").exists(), "a corrupt copy became visible in the cache"
    leftovers = [p for p in other.cache.rglob("big.bin")]
    assert leftovers == [], leftovers
    assert proxy.injected["corrupt"] >= 2  # the download was retried before giving up
    # the bucket copy was not damaged or deleted by the failed read
    assert direct.get_object(Bucket=bucket, Key="p/stage/k1/big.bin")["Body"].read() == payload


def test_persistent_throttling_fails_clearly_and_commits_nothing(s3, tmp_path, monkeypatch):
    proxy, direct, bucket = s3
    monkeypatch.setenv("LEVER_S3_MAX_ATTEMPTS", "2")
    store = _fresh(bucket, tmp_path)
    proxy.set_faults([Fault("503", match="big.bin", prob=1.0)])
    with pytest.raises(StoreError) as err:
        _artifact(store, "stage/k1", os.urandom(MB))
    assert "SlowDown" in str(err.value) or "503" in str(err.value)
    assert not _committed(direct, bucket, "stage/k1"), "an artifact missing a file was committed"
    assert _fresh(bucket, tmp_path).check("stage/k1") is None
    # the staging directory survives for the next attempt, which succeeds once the store recovers
    proxy.set_faults([])
    store.commit("stage/k1", {"stage": "test", "unit": "all"})
    assert _fresh(bucket, tmp_path).check("stage/k1") == []


def _manifests(direct, bucket: str, prefix: str) -> dict[str, dict]:
    out = {}
    for page in direct.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            if o["Key"].endswith("/_manifest.json") and "/.quarantine/" not in o["Key"]:
                key = o["Key"][len(prefix) + 1:-len("/_manifest.json")]
                out[key] = json.loads(direct.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
    return out


def test_pipeline_through_faults_matches_a_clean_run(s3, tmp_path, monkeypatch):
    """The (fake-stage) tiny pipeline run through a faulty store commits the same artifacts, file
    for file, as a run through a clean one."""
    from lever.config import load_plan
    from lever.pipeline.runner import load_baseline, run_plan
    from test_runner_fakes import fake_stages

    proxy, direct, bucket = s3
    small = ["infer.num_samples=8", "infer.shards=1", "infer.shots=[2]", "infer.baselines=[random]",
             "report.bootstrap_samples=100", "beam.shards=1", "rl_data.shards=2"]
    plan = load_plan("plan1", "tiny", small)
    base = load_baseline(plan, "tiny", small)
    run_plan(plan, S3Store(bucket, "clean", cache_dir=tmp_path / "c1"), baseline=base, stages=fake_stages(), jobs=1)
    proxy.set_faults([Fault("503", prob=0.1, limit=4), Fault("drop", prob=0.05, limit=3),
                      Fault("truncate", method="GET", prob=0.1, limit=4), Fault("corrupt", method="GET", prob=0.1, limit=4)])
    run_plan(plan, S3Store(bucket, "faulty", cache_dir=tmp_path / "c2"), baseline=base, stages=fake_stages(), jobs=1)
    assert sum(proxy.injected.values()) >= 5, proxy.injected
    clean, faulty = _manifests(direct, bucket, "clean"), _manifests(direct, bucket, "faulty")
    assert set(clean) == set(faulty)
    for key in clean:
        a, b = clean[key]["files"], faulty[key]["files"]
        if key.startswith("summarize/"):  # the report names its run id; compare its numbers instead
            a, b = {k: v for k, v in a.items() if k.endswith(".png")}, {k: v for k, v in b.items() if k.endswith(".png")}
            ra = json.loads(direct.get_object(Bucket=bucket, Key=f"clean/{key}/report.json")["Body"].read())
            rb = json.loads(direct.get_object(Bucket=bucket, Key=f"faulty/{key}/report.json")["Body"].read())
            assert ra["accuracy"] == rb["accuracy"] and ra["comparison"] == rb["comparison"]
        assert a == b, key


def test_quarantine_keeps_the_bytes(s3, tmp_path):
    """A download that keeps failing verification may be the network's fault: quarantining the
    artifact un-commits it but keeps every object under .quarantine/ (nothing finished is lost)."""
    proxy, direct, bucket = s3
    payload = os.urandom(MB)
    _artifact(_fresh(bucket, tmp_path), "stage/k1", payload)
    store = _fresh(bucket, tmp_path)
    where = store.quarantine("stage/k1", "downloads failed verification")
    assert store.check("stage/k1") is None
    prefix = where[len(f"s3://{bucket}/"):]
    kept = direct.get_object(Bucket=bucket, Key=f"{prefix}/big.bin")["Body"].read()
    assert kept == payload


def test_adaptive_retry_mode_also_survives_throttling(s3, tmp_path, monkeypatch):
    proxy, direct, bucket = s3
    monkeypatch.setenv("LEVER_S3_RETRY_MODE", "adaptive")
    payload = os.urandom(MB)
    proxy.set_faults([Fault("503", times=3)])
    _artifact(_fresh(bucket, tmp_path), "stage/k1", payload)
    local = _fresh(bucket, tmp_path).open("stage/k1")
    assert (local / "big.bin").read_bytes() == payload and proxy.injected["503"] == 3
    monkeypatch.setenv("LEVER_S3_RETRY_MODE", "fast")
    with pytest.raises(StoreError, match="LEVER_S3_RETRY_MODE"):
        _fresh(bucket, tmp_path).check("stage/k1")
