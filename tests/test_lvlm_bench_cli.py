"""The benchmark entry points as a user runs them: scripts/bench_*.sh -> ``lever bench ...``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "scripts" / script), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_bench_scoring_script_prints_the_table_agreement_and_speedup():
    out = _run("bench_scoring.sh", "--ks", "8,12", "--shots", "1,2", "--ref", "12,2,2", "--queries", "1", "--repeats", "1")
    lines = out.strip().splitlines()
    rows = [ln.split() for ln in lines if ln.split() and ln.split()[0] in {"8", "12"}]
    assert {(r[0], r[1], r[2]) for r in rows} == {("8", "2", "2"), ("12", "2", "2"), ("12", "2", "1")}
    for r in rows:
        assert float(r[6]) > 0 and float(r[7]) <= 1e-4  # ratio, max |dlogp|
    assert any(ln.startswith("agreement:") and ln.endswith("(ok)") for ln in lines)
    assert lines[-1].startswith("speedup: ") and float(lines[-1].split()[1]) > 0


def test_bench_infer_script_reports_identical_generations():
    out = _run("bench_infer.sh", "--queries", "4", "--shots", "0,1", "--repeats", "1")
    lines = out.strip().splitlines()
    assert any(ln.startswith("agreement: 8/8 generations identical (ok)") for ln in lines)
    assert lines[-1].startswith("speedup: ") and float(lines[-1].split()[1]) > 0


def test_bench_verdicts_script_compares_the_three_paths():
    out = _run("bench_verdicts.sh", "--queries", "2", "--candidates", "4", "--repeats", "1")
    lines = out.strip().splitlines()
    rows = {ln.split()[0]: ln.split() for ln in lines
            if ln.split() and ln.split()[0] in {"plain", "two-pass", "one-pass"} and ":" not in ln}
    assert set(rows) == {"plain", "two-pass", "one-pass"} and all(r[3] == "8/8" for r in rows.values())
    assert any(ln.startswith("agreement: 8/8 generations identical") and ln.endswith("(ok)") for ln in lines)
    assert any(ln.startswith("one-pass vs two-pass: ") for ln in lines)
    assert lines[-1].startswith("speedup: ") and float(lines[-1].split()[1]) > 0
