"""Unit leases, one backend at a time: the compare-and-swap rules, expiry, heartbeat and loss,
the create-only S3 manifest, ``lever store locks`` and ``lever store gc``.

The local backend is exercised across real processes (a holder in a subprocess, SIGKILLed); the
S3 backend against moto's real HTTP server, with its conditional requests serialized by the
loopback proxy (AWS executes them atomically; moto checks then writes).  The whole-plan tests with
two concurrent ``lever run`` processes are in test_reliability_leases.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lever.storage.lease import (
    FileLeases,
    HeldLease,
    LeaseError,
    LeaseLost,
    LeaseRecord,
    LeaseSettings,
    NoLeases,
    _expired,
)
from lever.storage.s3 import S3Store
from lever.storage.store import CorruptArtifact, LocalStore
from s3_faults import FaultProxy
from s3_server import moto_s3_behind_proxy

FAST = LeaseSettings(ttl_s=1.0, heartbeat_s=0.2, poll_s=0.05)


def _rec(key: str, who: str, ttl: float = 1.0) -> LeaseRecord:
    return LeaseRecord.new(key, {"run_id": who, "plan": "plan5", "host": "h", "pid": 1}, ttl)


def _until(what: str, cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- settings and the expiry rule ------------------------------------------------------------------

def test_settings_from_env(monkeypatch, tmp_path):
    for k in ("LEVER_LEASE_TTL_S", "LEVER_LEASE_HEARTBEAT_S", "LEVER_LEASE_POLL_S", "LEVER_LEASES"):
        monkeypatch.delenv(k, raising=False)
    assert LeaseSettings.from_env() == LeaseSettings(ttl_s=60.0, heartbeat_s=15.0, poll_s=2.0, enabled=True)
    monkeypatch.setenv("LEVER_LEASE_TTL_S", "8")
    assert LeaseSettings.from_env().heartbeat_s == 2.0  # ttl / 4 unless set
    monkeypatch.setenv("LEVER_LEASE_HEARTBEAT_S", "5")
    with pytest.raises(LeaseError, match="at most half"):
        LeaseSettings.from_env()
    monkeypatch.setenv("LEVER_LEASE_HEARTBEAT_S", "soon")
    with pytest.raises(LeaseError, match="LEVER_LEASE_HEARTBEAT_S='soon'"):
        LeaseSettings.from_env()
    monkeypatch.delenv("LEVER_LEASE_HEARTBEAT_S")
    monkeypatch.setenv("LEVER_LEASES", "maybe")
    with pytest.raises(LeaseError, match="on or off"):
        LeaseSettings.from_env()
    monkeypatch.setenv("LEVER_LEASES", "off")
    assert LeaseSettings.from_env().enabled is False
    assert isinstance(LocalStore(tmp_path).leases(), NoLeases)


def test_expiry_needs_a_whole_ttl_unchanged_or_an_abandoned_lease():
    holder = _rec("s/k", "a", ttl=10.0)
    holder.version = '"v1"'
    seen: dict = {}
    assert not _expired(holder, seen)  # first sight starts the waiter's own clock
    seen['"v1"'] = time.monotonic() - 9.0
    assert not _expired(holder, seen)
    seen['"v1"'] = time.monotonic() - 10.5
    assert _expired(holder, seen)
    renewed = LeaseRecord(**{**holder.__dict__, "seq": 1, "version": '"v2"'})
    assert not _expired(renewed, seen)  # a new version restarts the clock
    abandoned = LeaseRecord(**{**holder.__dict__, "renewed": time.time() - 21.0, "version": '"v3"'})
    assert _expired(abandoned, {})  # last heartbeat more than 2 x ttl ago: no need to watch it
    dead_local = LeaseRecord(**{**holder.__dict__, "ttl_s": 0.0})
    assert not _expired(dead_local, {None: 0.0})  # an unreadable local holder never expires by time


def test_record_describes_its_holder():
    rec = LeaseRecord.new("infer/abc", {"run_id": "r1", "plan": "plan6", "host": "node-3", "pid": 42,
                                        "pod": "plan6-infer-7", "workflow": "plan6-x2"}, 30.0)
    text = rec.describe(now=rec.acquired + 75)
    assert text.startswith("run r1, plan plan6, workflow plan6-x2, pod plan6-infer-7, node-3:42; holds it since ")
    assert "(75s ago), last heartbeat 75s ago" in text
    back = LeaseRecord.from_bytes("infer/abc", rec.to_bytes(), '"e"', fallback_time=0, fallback_ttl=1)
    assert back == rec and back.version == '"e"'
    junk = LeaseRecord.from_bytes("infer/abc", b"{not json", None, fallback_time=123.0, fallback_ttl=9.0)
    assert junk.renewed == 123.0 and junk.ttl_s == 9.0 and "unreadable" in junk.who()


# -- local: flock, across real processes -----------------------------------------------------------

_HOLDER = """
import sys, time
from pathlib import Path
from lever.storage.lease import FileLeases, LeaseRecord
b = FileLeases(Path(sys.argv[1]))
ok, _ = b.try_acquire(LeaseRecord.new("infer/k1", {"run_id": "holder", "host": "h", "pid": 0}, 60.0))
Path(sys.argv[2]).write_text("held" if ok else "busy")
time.sleep(120)
"""


def test_local_lease_excludes_other_processes_and_dies_with_its_holder(tmp_path):
    root = tmp_path / "store"
    flag = tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root), str(flag)],
                            start_new_session=True)
    try:
        _until("the holder", flag.exists)
        assert flag.read_text() == "held"
        mine = FileLeases(root)
        got, holder = mine.try_acquire(_rec("infer/k1", "me"))
        assert not got and holder is not None and holder.owner["run_id"] == "holder"
        [(listed, alive)] = mine.list()
        assert listed.key == "infer/k1" and alive
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    [(listed, alive)] = mine.list()
    assert not alive  # the kernel dropped the dead holder's lock; its info file is still there
    rec = _rec("infer/k1", "me")
    got, _ = mine.try_acquire(rec)
    assert got and mine.read("infer/k1").token == rec.token
    mine.release(rec)
    assert not list((root / ".leases").rglob("*.*"))  # released: lock and info files are gone
    got, _ = FileLeases(root).try_acquire(_rec("infer/k1", "next"))
    assert got


def test_local_release_never_lets_two_in(tmp_path):
    """The unlink-on-release race: a waiter that opened the old lock file before the holder
    removed it must not get the lease alongside one that locks the new file."""
    a, b, c = FileLeases(tmp_path), FileLeases(tmp_path), FileLeases(tmp_path)
    ra = _rec("s/k", "a")
    assert a.try_acquire(ra)[0]
    lock = tmp_path / ".leases" / "s" / "k.lock"
    import fcntl

    stale_fd = os.open(lock, os.O_RDWR)  # b has opened the old file ...
    a.release(ra)  # ... a unlinks it and lets go
    assert c.try_acquire(_rec("s/k", "c"))[0]  # c locks the new file
    fcntl.flock(stale_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # b's lock on the unlinked file succeeds ...
    os.close(stale_fd)
    assert b.try_acquire(_rec("s/k", "b")) == (False, b.read("s/k"))  # ... but b's acquire sees c's lease


# -- S3: conditional writes on moto's server -------------------------------------------------------

@pytest.fixture()
def s3(monkeypatch):
    """moto server, a bucket, and a gate proxy in front that serializes conditional requests."""
    monkeypatch.delenv("LEVER_LEASES", raising=False)
    with moto_s3_behind_proxy(monkeypatch, {"LEVER_S3_MAX_ATTEMPTS": "3"}, gate=threading.Lock()) as env:
        yield env


def test_the_test_server_enforces_conditional_requests_like_aws(s3):
    """What docs/reliability.md states about moto's server, pinned: the four conditional requests
    the leases use fail the way AWS documents (412 PreconditionFailed; If-Match on a missing key
    404).  A moto upgrade that changed this would make the lease tests prove less."""
    from botocore.exceptions import ClientError

    upstream, _, direct, bucket = s3

    def code(**kw) -> str:
        try:
            (direct.delete_object if kw.pop("delete", False) else direct.put_object)(Bucket=bucket, **kw)
        except ClientError as exc:
            return exc.response["Error"]["Code"]
        return "ok"

    etag = direct.put_object(Bucket=bucket, Key="l", Body=b"1", IfNoneMatch="*")["ETag"]
    assert code(Key="l", Body=b"2", IfNoneMatch="*") == "PreconditionFailed"
    assert code(Key="l", Body=b"3", IfMatch='"00000000000000000000000000000000"') == "PreconditionFailed"
    assert code(Key="missing", Body=b"3", IfMatch=etag) == "NoSuchKey"
    assert code(Key="l", delete=True, IfMatch='"00000000000000000000000000000000"') == "PreconditionFailed"
    assert direct.get_object(Bucket=bucket, Key="l")["Body"].read() == b"1"
    assert code(Key="l", Body=b"4", IfMatch=etag) == "ok"
    new_etag = direct.head_object(Bucket=bucket, Key="l")["ETag"]
    assert code(Key="l", delete=True, IfMatch=etag) == "PreconditionFailed"  # the old version
    assert code(Key="l", delete=True, IfMatch=new_etag) == "ok"


def _store(bucket: str, tmp_path: Path, name: str) -> S3Store:
    return S3Store(bucket, "p", cache_dir=tmp_path / name)


def _leases(store: S3Store):
    from lever.storage.s3_leases import S3Leases

    return S3Leases(store, FAST)


def test_s3_lease_is_a_compare_and_swap(s3, tmp_path):
    _, proxy, direct, bucket = s3
    a, b = _leases(_store(bucket, tmp_path, "a")), _leases(_store(bucket, tmp_path, "b"))
    ra = _rec("beams/k1", "run-a")
    assert a.try_acquire(ra) == (True, None) and ra.version
    assert proxy.requests("PUT", "/.leases/beams/k1.json")
    got, holder = b.try_acquire(_rec("beams/k1", "run-b"))
    assert not got and holder.token == ra.token and holder.owner["run_id"] == "run-a"
    # a retried create whose first answer was lost: the lease holds our token, so it is ours
    assert a.try_acquire(ra) == (True, None)
    # a renews: the version b saw is now stale, so b's takeover of it fails
    old = holder
    assert a.renew(ra) and ra.version != old.version and ra.seq == 1
    assert not b.take_over(_rec("beams/k1", "run-b"), old)
    # b takes over the current version (as after a ttl without heartbeats): a has lost it
    current = b.read("beams/k1")
    rb = _rec("beams/k1", "run-b")
    assert b.take_over(rb, current)
    assert not a.renew(ra)
    a.release(ra)  # releasing a lost lease leaves the new holder's alone
    assert b.read("beams/k1").token == rb.token
    assert b.renew(rb)
    b.release(rb)
    assert b.read("beams/k1") is None
    names = [o["Key"] for o in direct.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert names == [], names  # the support probe and both leases are gone


def test_s3_endpoint_ignoring_conditional_headers_is_refused(s3, tmp_path, monkeypatch):
    upstream, _, _, bucket = s3
    with FaultProxy(upstream, drop_headers=("If-Match", "If-None-Match")) as deaf:
        monkeypatch.setenv("LEVER_S3_ENDPOINT", deaf.url)
        store = _store(bucket, tmp_path, "a")
        with pytest.raises(LeaseError, match="ignores conditional writes.*LEVER_LEASES=off"):
            store.leases().try_acquire(_rec("s/k", "a"))
        monkeypatch.setenv("LEVER_LEASES", "off")  # the documented escape: no coordination
        off = _store(bucket, tmp_path, "b")
        assert isinstance(off.leases(), NoLeases)
        with off.staging("s/k") as st:
            (st.path / "x.txt").write_text("x")
        off.commit("s/k", {})
        assert _store(bucket, tmp_path, "c").check("s/k") == []


def test_heartbeat_keeps_the_lease_and_a_takeover_is_noticed(s3, tmp_path):
    _, _, _, bucket = s3
    a, b = _leases(_store(bucket, tmp_path, "a")), _leases(_store(bucket, tmp_path, "b"))
    ra = _rec("train-rce/k", "run-a")
    assert a.try_acquire(ra)[0]
    held = HeldLease(a, ra, FAST)
    try:
        first = ra.version
        _until("a heartbeat", lambda: b.read("train-rce/k").seq >= 2)
        assert b.read("train-rce/k").version != first
        held.ensure("commit")  # still ours
        rb = _rec("train-rce/k", "run-b")
        # the CAS fails whenever a heartbeat lands between b's read and b's write: b retries
        _until("b's takeover", lambda: b.take_over(rb, b.read("train-rce/k")))
        _until("the holder to notice", lambda: held.lost is not None)
        assert "run-b" in held.lost
        with pytest.raises(LeaseLost, match="taken over by run run-b"):
            held.ensure("commit")
    finally:
        held.close()
    assert b.read("train-rce/k").token == rb.token  # close() did not remove b's lease


def test_a_holder_cut_off_past_its_ttl_renews_before_commit_if_nobody_took_over(s3, tmp_path):
    _, proxy, _, bucket = s3
    from s3_faults import Fault

    a = _leases(_store(bucket, tmp_path, "a"))
    ra = _rec("infer/k", "run-a")
    assert a.try_acquire(ra)[0]
    held = HeldLease(a, ra, FAST)
    try:
        proxy.set_faults([Fault("drop", prob=1.0)])  # every request dropped: heartbeats fail
        _until("the lease to go stale", lambda: not held.valid(), timeout=30)
        proxy.set_faults([])
        held.ensure("commit")  # a synchronous If-Match renewal succeeds: nobody took it over
        assert held.valid()
    finally:
        held.close()


# -- the create-only manifest ------------------------------------------------------------------------

def _build(store: S3Store, key: str, payload: str) -> None:
    with store.staging(key) as st:
        (st.path / "rows.jsonl").write_text(payload)


def test_s3_manifest_is_written_once_even_when_two_builders_overlap(s3, tmp_path):
    _, proxy, direct, bucket = s3
    a, b = _store(bucket, tmp_path, "a"), _store(bucket, tmp_path, "b")
    _build(a, "infer/k", "same\n")
    _build(b, "infer/k", "same\n")

    def a_commits_first(what: str) -> None:  # b's guard: a commits while b is about to write its manifest
        if what == "writing the manifest":
            a.commit("infer/k", {"run_id": "run-a"})

    mb = b.commit("infer/k", {"run_id": "run-b"}, guard=a_commits_first)
    assert mb["run_id"] == "run-a"  # b adopted a's artifact
    assert len(proxy.requests("PUT", "/p/infer/k/_manifest.json")) == 2  # both tried, one was written
    body = json.loads(direct.get_object(Bucket=bucket, Key="p/infer/k/_manifest.json")["Body"].read())
    assert body["run_id"] == "run-a"
    fresh = _store(bucket, tmp_path, "c")
    assert (fresh.open("infer/k") / "rows.jsonl").read_text() == "same\n"
    # a third builder that starts after the commit does not even upload
    _build(fresh, "infer/k", "same\n")
    n = len(proxy.requests("PUT"))
    assert fresh.commit("infer/k", {"run_id": "run-c"})["run_id"] == "run-a"
    assert len(proxy.requests("PUT")) == n


def test_overlapping_builders_with_different_bytes_are_caught_not_hidden(s3, tmp_path):
    """What a lease prevents, shown without it: the loser's late upload overwrote the winner's
    bytes.  The manifest stays the winner's, and the mismatch is caught by the sha256 check."""
    _, _, _, bucket = s3
    a, b = _store(bucket, tmp_path, "a"), _store(bucket, tmp_path, "b")
    _build(a, "infer/k", "from a\n")
    _build(b, "infer/k", "from b\n")
    # a commits completely just before b uploads: b's bytes land on a's committed files
    b.commit("infer/k", {"run_id": "run-b"}, guard=lambda w: w == "uploading rows.jsonl" and a.commit("infer/k", {}))
    assert _store(bucket, tmp_path, "c").check("infer/k") == []  # same size: only the hash can tell
    with pytest.raises(CorruptArtifact, match="sha256"):
        _store(bucket, tmp_path, "c").open("infer/k")


# -- lever store locks / gc ----------------------------------------------------------------------------

def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lever", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _old(path: Path, days: float) -> None:
    t = time.time() - days * 86400
    for p in [path, *path.rglob("*")]:
        os.utime(p, (t, t))


def test_store_locks_lists_live_leases(tmp_path):
    store = LocalStore(tmp_path / "store")
    held = store.leases()
    rec = LeaseRecord.new("train-grpo/abc", {"run_id": "nightly-7", "plan": "plan5", "host": "gpu-2", "pid": 99,
                                             "unit": "train-grpo all"}, 60.0)
    assert held.try_acquire(rec)[0]
    out = _cli("store", "locks", "--store", str(store.root), "--json")
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    assert row["key"] == "train-grpo/abc" and row["state"] == "live" and row["owner"]["run_id"] == "nightly-7"
    table = _cli("store", "locks", "--store", str(store.root), env={"COLUMNS": "200"})
    assert "run nightly-7, plan plan5, gpu-2:99" in table.stdout and "train-grpo all" in table.stdout
    held.release(rec)
    assert "no live leases" in _cli("store", "locks", "--store", str(store.root)).stdout


def test_store_gc_is_a_dry_run_until_applied(tmp_path):
    from reliability_store import tree_hash

    store = LocalStore(tmp_path / "store")
    for key, days in (("infer/old1", 10), ("infer/new1", 0), ("train-rce/busy", 10), ("partial/plan1/r1", 10)):
        with store.staging(key) as st:
            (st.path / "part.jsonl").write_text("x" * 1000)
        if days:
            _old(store.root / ".staging" / key, days)
    q = store.root / ".quarantine" / "infer__bad-1"
    q.mkdir(parents=True)
    (q / "predictions.jsonl").write_text("broken")
    _old(q, 30)
    _dead_holder(store.root, "beams/dead", days=3)  # its lock and info files stay behind
    live = store.leases()
    busy_rec = LeaseRecord.new("train-rce/busy", {"run_id": "alive"}, 60.0)
    assert live.try_acquire(busy_rec)[0]

    before = tree_hash(store.root, skip=())
    dry = _cli("store", "gc", "--store", str(store.root), "--older-than", "2d", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = {(r["kind"], r["name"]): r["outcome"] for r in json.loads(dry.stdout)}
    assert plan == {("staging", "infer/old1"): "would remove", ("staging", "partial/plan1/r1"): "would remove",
                    ("staging", "train-rce/busy"): "kept: its unit is being built (run alive, ?:?)",
                    ("quarantine", "infer__bad-1"): "would remove", ("lease", "beams/dead"): "would remove"}
    assert tree_hash(store.root, skip=()) == before  # a dry run removes nothing
    bad = _cli("store", "gc", "--store", str(store.root), "--older-than", "soon")
    assert bad.returncode == 2 and "--older-than 'soon'" in bad.stderr

    done = _cli("store", "gc", "--store", str(store.root), "--older-than", "2d", "--apply")
    assert done.returncode == 0, done.stderr
    assert "removed 4 item(s)" in done.stdout
    left = {p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file()}
    assert ".staging/infer/new1/part.jsonl" in left and ".staging/train-rce/busy/part.jsonl" in left
    assert not [p for p in left if p.startswith((".quarantine/", ".staging/infer/old1", ".staging/partial/",
                                                 ".leases/beams/"))]
    live.release(busy_rec)


def _dead_holder(root: Path, key: str, days: float) -> None:
    """A process that took a lease ``days`` ago (its last heartbeat) and died without releasing it."""
    t = time.time() - days * 86400
    code = ("import os, sys; from pathlib import Path; "
            "from lever.storage.lease import FileLeases, LeaseRecord; "
            f"FileLeases(Path(sys.argv[1])).try_acquire(LeaseRecord({key!r}, 'tok', {{'run_id': 'killed'}}, {t}, {t}, 60.0)); "
            "os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, timeout=60)


def test_s3_gc_keeps_what_a_live_lease_names(s3, tmp_path):
    from lever.storage.gc import apply_gc, plan_gc

    _, _, direct, bucket = s3
    store = _store(bucket, tmp_path, "a")
    for key in ("infer/old", "infer/held"):
        with store.staging(key) as st:
            (st.path / "predictions.jsonl").write_text("{}\n")
        store.sync_staging(key)
    holder = store.leases()
    rec = LeaseRecord.new("infer/held", {"run_id": "alive"}, 3600.0)  # renewed "now", ttl 1h: live
    assert holder.try_acquire(rec)[0]
    later = time.time() + 3 * 86400
    plan = {(g.item.kind, g.item.name): g.kept for g in plan_gc(store, 86400, now=later)}
    assert plan == {("staging", "infer/old"): "", ("staging", "infer/held"): "its unit is being built (run alive, ?:?)"}
    assert plan_gc(store, 4 * 86400, now=later) == []  # nothing is 4 days old
    out = {g.item.name: o for g, o in apply_gc(store, plan_gc(store, 86400, now=later))}
    assert out == {"infer/old": "removed", "infer/held": "kept: its unit is being built (run alive, ?:?)"}
    names = [o["Key"] for o in direct.list_objects_v2(Bucket=bucket, Prefix="p/.staging/").get("Contents", [])]
    assert names == ["p/.staging/infer/held/predictions.jsonl"]
    holder.release(rec)
