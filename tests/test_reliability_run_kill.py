"""``lever run`` killed with SIGKILL mid-way, then run again: it picks up where it stopped.

The subprocess is the real CLI, runner, store and summarizer; the compute stages are the fakes of
tests/test_runner_fakes.py (deterministic, resumable per query like the real shards) so the test
stays within seconds.  One infer unit blocks after writing its predictions (uncommitted); the test
SIGKILLs the whole process group there.  The rerun must not redo committed units, must finish,
and must report the same numbers as an uninterrupted run in a separate store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "reliability_store.py"
SETS = ["--set", "infer.num_samples=8", "--set", "infer.shards=2", "--set", "infer.shots=[1,2]",
        "--set", "report.bootstrap_samples=100"]
HANG_UNIT = "infer:variantselector-shot2-shard1-of2"


def _lever(store: Path, log: Path, extra_env: dict | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "LEVER_FAKE_LOG": str(log), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "LEVER_GIT_COMMIT": "test", **(extra_env or {})}
    return subprocess.Popen([sys.executable, str(DRIVER), "run", "plan1", "--profile", "tiny", "--store", str(store),
                             "-j", "2", *SETS], env=env, cwd=str(HERE.parent), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _report(stdout: str) -> dict:
    path = Path(stdout.strip().splitlines()[-1])
    assert path.name == "report.md", stdout
    return json.loads((path.parent / "report.json").read_text())


def _log(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
def test_lever_run_after_sigkill_resumes_and_matches_an_uninterrupted_run(tmp_path):
    # the uninterrupted reference
    ref = _lever(tmp_path / "ref", tmp_path / "ref.log")
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    want = _report(out)

    # the killed run
    flag = tmp_path / "hang.flag"
    store, log = tmp_path / "store", tmp_path / "run.log"
    p = _lever(store, log, {"LEVER_TEST_HANG": HANG_UNIT, "LEVER_TEST_HANG_FLAG": str(flag)})
    try:
        deadline = time.monotonic() + 240
        while not flag.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flag.exists(), (p.poll(), p.stderr.read() if p.poll() is not None else "")
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    first = _log(log)
    assert any(line.endswith(" infer variantselector-shot2-shard1-of2") for line in first)
    assert not any(" summarize " in line for line in first)
    committed_before = {d.parent.name + "/" + d.name for d in (store).glob("*/*") if (d / "_manifest.json").exists()}
    assert committed_before, "nothing was committed before the kill"

    # the rerun: same command, no hang
    log.write_text("")
    again = _lever(store, log)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    rerun = _log(log)
    got = _report(out)
    # work committed before the kill was not redone; the killed unit was
    redone_stages = {line.split()[1] for line in rerun}
    assert "prepare-data" not in redone_stages and "export-embeddings" not in redone_stages
    assert any(line.endswith(" infer variantselector-shot2-shard1-of2") for line in rerun)
    assert len(rerun) < len(_log(tmp_path / "ref.log"))
    for key in ("accuracy", "n", "comparison", "average", "icd_overlap", "reward_data"):
        assert got[key] == want[key], key


REAL_SETS = [a for kv in ("infer.num_samples=8", "report.bootstrap_samples=100", "beam.num_queries=8",
                          "rl_data.num_queries=8", "infer.shots=[1,2]", "lvlm.warmup_steps=0", "beam.shards=2",
                          "rl_data.shards=2", "infer.shards=2", "rce.epochs=3") for a in ("--set", kv)]


def _real(store: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "LEVER_GIT_COMMIT": "test"}
    return subprocess.Popen([sys.executable, "-m", "lever", "run", "baseline", "--profile", "tiny", "--store", str(store),
                             "-j", "1", *REAL_SETS], env=env, cwd=str(HERE.parent), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def real_reference(tmp_path_factory) -> dict:
    """report.json of an uninterrupted real run (shared by the kill points)."""
    ref = _real(tmp_path_factory.mktemp("ref") / "store")
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    return _report(out)


@pytest.mark.slow
@pytest.mark.parametrize("kill_when", ["generate-beams", "train-v2"])
def test_real_lever_run_sigkilled_midway_resumes_to_the_same_report(tmp_path, kill_when, real_reference):
    """The real stages: SIGKILL once ``kill_when`` has committed (the next stage is then in flight),
    rerun, and compare the report's numbers with an uninterrupted run's."""
    want = real_reference
    store = tmp_path / "store"
    p = _real(store)
    try:
        deadline = time.monotonic() + 240
        while p.poll() is None and time.monotonic() < deadline:
            if list(store.glob(f"{kill_when}/*/_manifest.json")):
                break
            time.sleep(0.02)
        assert p.poll() is None, "the run finished before it could be killed"
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert not list(store.glob("summarize/*/_manifest.json"))
    again = _real(store)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert "cached" in err  # finished stages were reused, not rebuilt
    got = _report(out)
    for key in ("accuracy", "n", "comparison", "average", "icd_overlap", "reward_data", "training"):
        assert got[key] == want[key], key
