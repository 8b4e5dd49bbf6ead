"""Two ``lever run`` processes on one store at once: every unit is computed once.

Each process is the real CLI, runner, store (local directory, or S3 on moto's loopback server,
each process with its own cache like two nodes) and summarizer; the compute stages are the fakes
of tests/test_runner_fakes.py.  Every stage entry -- in either process or any of their workers --
appends "stage unit-hash run-id" to one shared log (tests/reliability_store.py), which is how the
tests count computations.  Runs overlap for certain: the first run blocks inside its first unit
until the second is seen waiting for it (``LEVER_TEST_HANG_UNTIL``); on the local store stages then
take 50 ms each, infer units 300 ms (so the second run catches up with the first inside a
fanned-out stage; on S3 the round trips take that long already).
Lease timings are shortened (ttl 2 s, heartbeat 0.4 s, poll 0.2 s).

S3's conditional requests go through the loopback proxy with a gate that serializes them: AWS
executes a conditional write atomically, moto checks and then writes in two steps.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from s3_faults import Fault, FaultProxy
from s3_server import TEST_KEY_ID, TEST_SECRET

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "reliability_store.py"
SETS = ["--set", "infer.num_samples=8", "--set", "infer.shards=2", "--set", "infer.shots=[2]",
        "--set", "checkpoint.evaluate_epochs=[]", "--set", "report.bootstrap_samples=100"]
LEASES = {"LEVER_LEASE_TTL_S": "2", "LEVER_LEASE_HEARTBEAT_S": "0.4", "LEVER_LEASE_POLL_S": "0.2"}
HANG_UNIT = "infer:variantselector-shot2-shard1-of2"
NUMBERS = ("accuracy", "n", "comparison", "average", "icd_overlap", "reward_data")

pytestmark = pytest.mark.slow


class Run:
    """One ``lever run`` subprocess with stdout/stderr in files (read while it runs)."""

    def __init__(self, tmp: Path, name: str, store: str, env: dict, jobs: int = 1):
        self.name, self.out, self.err = name, tmp / f"{name}.out", tmp / f"{name}.err"
        full = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "LEVER_GIT_COMMIT": "test",
                "LEVER_TEST_ENTRY_LOG": str(tmp / "entries.log"), "LEVER_TEST_STAGE_DELAY_S": "infer=0.3,*=0.05",
                **LEASES, **env}
        full.pop("AWS_PROFILE", None)
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(DRIVER), "run", "plan1", "--profile", "tiny", "--store", store, "-j", str(jobs),
                 "--run-id", name, *SETS], env=full, cwd=str(HERE.parent), start_new_session=True,
                stdout=out, stderr=err, stdin=subprocess.DEVNULL)

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr():
            assert self.proc.poll() is None, f"{self.name} exited ({self.proc.returncode}):\n{self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"{self.name}: no {text!r} in:\n{self.stderr()[-3000:]}"
            time.sleep(0.05)

    def finish(self, timeout: float = 240) -> str:
        """Wait for a clean exit; returns the report location (the last stdout line)."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.kill()
        assert self.proc.returncode == 0, f"{self.name} failed:\n{self.stderr()[-4000:]}"
        return self.out.read_text().strip().splitlines()[-1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def _until(what: str, cond, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _entries(tmp: Path) -> list[tuple[str, str]]:
    """(unit key, run id) of every stage entry, in order."""
    out = []
    for line in (tmp / "entries.log").read_text().splitlines():
        stage, unit_hash, run_id = line.split()
        out.append((f"{stage}/{unit_hash}", run_id))
    return out


# -- the two stores ---------------------------------------------------------------------------------

class LocalBackend:
    name = "local"

    def __init__(self, tmp: Path):
        self.root = tmp / "store"
        self.url = str(self.root)

    def env(self, who: str) -> dict:
        return {}  # the default stage delays: local units take milliseconds otherwise

    def store(self):
        from lever.storage.store import LocalStore

        return LocalStore(self.root)

    def manifests(self) -> dict[str, dict]:
        return {p.parent.relative_to(self.root).as_posix(): json.loads(p.read_text())
                for p in self.root.glob("*/*/_manifest.json")}

    def leftovers(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for area in (".staging", ".quarantine", ".leases")
                for p in (self.root / area).rglob("*") if p.is_file()]

    def verify_all(self) -> None:
        from lever.storage.store import LocalStore

        fresh = LocalStore(self.root)
        for key in self.manifests():
            assert fresh.check(key) == [], key

    def report(self, location: str) -> dict:
        return json.loads((Path(location).parent / "report.json").read_text())


class S3Backend:
    """moto's server; a gate proxy per process ("a" and "b"), sharing one gate."""

    name = "s3"

    def __init__(self, tmp: Path):
        import boto3
        from moto.server import ThreadedMotoServer

        self.tmp = tmp
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO record per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.upstream = f"http://{host}:{port}"
        self.bucket = f"lever-{uuid.uuid4().hex[:8]}"
        self.url = f"s3://{self.bucket}/lever"
        self.direct = boto3.client("s3", endpoint_url=self.upstream, region_name="us-east-1",
                                   aws_access_key_id=TEST_KEY_ID, aws_secret_access_key=TEST_SECRET)
        self.direct.create_bucket(Bucket=self.bucket)
        gate = threading.Lock()
        self.proxies = {who: FaultProxy(self.upstream, gate=gate).start() for who in ("a", "b", "test")}

    def close(self) -> None:
        for p in self.proxies.values():
            p.stop()
        self.server.stop()

    def env(self, who: str) -> dict:
        # S3 round trips already make each unit take ~0.4 s on loopback: no added compute time
        return {"LEVER_TEST_STAGE_DELAY_S": "0", "LEVER_S3_ENDPOINT": self.proxies[who].url, "AWS_ACCESS_KEY_ID": TEST_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": TEST_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                "LEVER_STORE_CACHE": str(self.tmp / f"cache-{who}-{uuid.uuid4().hex[:4]}"), "LEVER_S3_MAX_ATTEMPTS": "4"}

    def store(self):
        """A store for the test itself, with a fresh cache, through its own proxy."""
        import boto3

        from lever.storage.s3 import S3Store

        client = boto3.client("s3", endpoint_url=self.proxies["test"].url, region_name="us-east-1",
                              aws_access_key_id=TEST_KEY_ID, aws_secret_access_key=TEST_SECRET)
        return S3Store(self.bucket, "lever", cache_dir=self.env("test")["LEVER_STORE_CACHE"], client=client)

    def _names(self, prefix: str) -> list[str]:
        out = []
        for page in self.direct.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def manifests(self) -> dict[str, dict]:
        out = {}
        for name in self._names("lever/"):
            rel = name[len("lever/"):]
            if rel.endswith("/_manifest.json") and not rel.startswith("."):
                out[rel[: -len("/_manifest.json")]] = json.loads(
                    self.direct.get_object(Bucket=self.bucket, Key=name)["Body"].read())
        return out

    def leftovers(self) -> list[str]:
        return [n for area in (".staging/", ".quarantine/", ".leases/") for n in self._names("lever/" + area)]

    def verify_all(self) -> None:
        fresh = self.store()  # an empty cache: every file is downloaded and its sha256 checked
        for key in self.manifests():
            fresh.open(key)

    def report(self, location: str) -> dict:
        name = location[len(f"s3://{self.bucket}/"):].rsplit("/", 1)[0] + "/report.json"
        return json.loads(self.direct.get_object(Bucket=self.bucket, Key=name)["Body"].read())


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path, monkeypatch):
    monkeypatch.delenv("LEVER_LEASES", raising=False)
    b = LocalBackend(tmp_path) if request.param == "local" else S3Backend(tmp_path)
    try:
        yield b
    finally:
        if isinstance(b, S3Backend):
            b.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One uninterrupted run: its report numbers and how many units it computed."""
    tmp = tmp_path_factory.mktemp("reference")
    run = Run(tmp, "ref", str(tmp / "store"), {})
    location = run.finish()
    return {"report": json.loads((Path(location).parent / "report.json").read_text()), "units": len(_entries(tmp))}


def _assert_clean(backend) -> None:
    """Nothing corrupted, nothing left behind: every committed artifact verifies, and no staging,
    quarantine or lease remains."""
    backend.verify_all()
    assert backend.leftovers() == []


# -- the tests ----------------------------------------------------------------------------------------

def test_two_runs_of_one_plan_at_once_compute_each_unit_once(backend, tmp_path, reference):
    release = tmp_path / "release"
    a = Run(tmp_path, "run-a", backend.url, {**backend.env("a"), "LEVER_TEST_HANG": "prepare-data:all",
                                            "LEVER_TEST_HANG_FLAG": str(tmp_path / "flag"),
                                            "LEVER_TEST_HANG_UNTIL": str(release)})
    b = None
    try:
        _until("run-a inside prepare-data", (tmp_path / "flag").exists)
        b = Run(tmp_path, "run-b", backend.url, backend.env("b"))
        b.wait_for("prepare-data/all: waiting for prepare-data/")
        assert "held by run run-a, plan baseline" in b.stderr()  # the baseline plan runs first
        release.touch()
        report_a, report_b = a.finish(), b.finish()
    finally:
        a.kill()
        if b is not None:
            b.kill()
    entries = _entries(tmp_path)
    per_unit = Counter(key for key, _ in entries)
    assert max(per_unit.values()) == 1, [k for k, n in per_unit.items() if n > 1]
    assert len(per_unit) == reference["units"]  # every unit once, none skipped
    assert set(per_unit) == set(backend.manifests())  # ... and each computed unit is committed
    # the second run did not just wait: it took the units the first one was not building
    by_run = Counter(run for _, run in entries)
    assert by_run["run-a"] > 0 and by_run["run-b"] > 0, by_run
    assert "committed by another run; using it" in b.stderr()
    assert report_a == report_b
    got = backend.report(report_a)
    for key in NUMBERS:
        assert got[key] == reference["report"][key], key
    _assert_clean(backend)


def test_a_sigkilled_holder_is_taken_over_and_the_result_equals_an_uninterrupted_run(backend, tmp_path, reference):
    flag = tmp_path / "flag"
    a = Run(tmp_path, "run-a", backend.url, {**backend.env("a"), "LEVER_TEST_HANG": HANG_UNIT,
                                            "LEVER_TEST_HANG_FLAG": str(flag), "LEVER_STAGING_SYNC_S": "0.2"})
    b = None
    try:
        _until("run-a inside the infer unit", flag.exists)
        hung = flag.read_text().split()[1]
        b = Run(tmp_path, "run-b", backend.url, backend.env("b"))
        b.wait_for(f"{HANG_UNIT.replace(':', '/')}: waiting for {hung}")
        held_by_a = {rec.key for rec, alive in backend.store().leases().list() if rec.owner.get("run_id") == "run-a"}
        assert hung in held_by_a
        a.kill()  # SIGKILL, the whole process group: no lease is released, no staging cleaned
        location = b.finish()
    finally:
        a.kill()
        if b is not None:
            b.kill()
    if backend.name == "s3":  # a lease in S3 outlives its holder: taken over only after its ttl
        assert f"taking over {hung} from run run-a" in b.stderr()
    per_unit = Counter(key for key, _ in _entries(tmp_path))
    twice = {k for k, n in per_unit.items() if n == 2}
    assert hung in twice and twice <= held_by_a and max(per_unit.values()) == 2  # only the killed work was redone
    assert len(per_unit) == reference["units"]
    got = backend.report(location)
    for key in NUMBERS:
        assert got[key] == reference["report"][key], key
    _assert_clean(backend)


def test_holder_cut_off_from_s3_past_its_ttl_commits_nothing(tmp_path, reference, monkeypatch):
    """Run a holds a unit and loses its S3 connection (every request dropped) for longer than the
    lease ttl; run b takes the unit over, builds and commits it.  When a's connection and its
    stage come back, a must not commit: the unit has one manifest, written once, by b."""
    monkeypatch.delenv("LEVER_LEASES", raising=False)
    s3 = S3Backend(tmp_path)
    flag, release = tmp_path / "flag", tmp_path / "release"
    a = b = None
    try:
        a = Run(tmp_path, "run-a", s3.url, {**s3.env("a"), "LEVER_TEST_HANG": HANG_UNIT,
                                          "LEVER_TEST_HANG_FLAG": str(flag), "LEVER_TEST_HANG_UNTIL": str(release)},
                jobs=1)
        _until("run-a inside the infer unit", flag.exists)
        hung = flag.read_text().split()[1]
        b = Run(tmp_path, "run-b", s3.url, s3.env("b"))
        b.wait_for(f"{HANG_UNIT.replace(':', '/')}: waiting for {hung}")
        s3.proxies["a"].set_faults([Fault("drop", prob=1.0)])  # run a's network is gone
        location_b = b.finish()
        assert f"taking over {hung} from run run-a" in b.stderr()
        s3.proxies["a"].set_faults([])  # back online; then a's stage returns and a tries to commit
        release.touch()
        location_a = a.finish()
        manifest = f"/lever/{hung}/_manifest.json"
        assert s3.proxies["a"].injected["drop"] > 0
        assert not s3.proxies["a"].requests("PUT", manifest), "the cut-off holder wrote a manifest"
        assert len(s3.proxies["b"].requests("PUT", manifest)) == 1
        assert s3.manifests()[hung]["run_id"] == "run-b"
        assert f"lease of {hung} lost" in a.stderr()
        per_unit = Counter(key for key, _ in _entries(tmp_path))
        assert per_unit[hung] == 2 and {k for k, n in per_unit.items() if n > 1} == {hung}
        assert location_a == location_b
        got = s3.report(location_b)
        for key in NUMBERS:
            assert got[key] == reference["report"][key], key
        _assert_clean(s3)
    finally:
        for r in (a, b):
            if r is not None:
                r.kill()
        s3.close()
