"""The real tiny pipeline through ``lever campaign run`` (shrunk): a leaderboard from a fresh
store, a rerun fully cached, one more grid value building only the new member's units."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

SHRINK = ["beam.num_queries=8", "rl_data.num_queries=8", "infer.num_samples=12", "rce.epochs=2", "grpo.epochs=2",
          "v2.epochs=2", "report.bootstrap_samples=200"]


def _campaign(path: Path, lrs: str) -> Path:
    path.write_text(f"""\
name: e2e
baseline: baseline
shots: [1, 2]
set: {json.dumps(SHRINK)}
leaderboard: {{bootstrap_samples: 200, permutations: 2000}}
sweeps:
  - plan: plan5
    grid: {{grpo.lr: {lrs}}}
""")
    return path


def _run(camp: Path, store: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQDM_DISABLE="1")
    p = subprocess.run([sys.executable, "-m", "lever", "campaign", "run", str(camp), "--profile", "tiny",
                        "--store", str(store)], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _counts(stderr: str) -> tuple[int, int, int]:
    m = re.search(r"(\d+) distinct units: (\d+) built, (\d+) reused", " ".join(stderr.split()))
    assert m, stderr[-2000:]
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def test_tiny_sweep_campaign_runs_caches_and_grows(tmp_path):
    store = tmp_path / "store"
    camp = _campaign(tmp_path / "c.yaml", "[5.0e-6, 5.0e-5]")
    p1 = _run(camp, store)
    md = Path(p1.stdout.strip().splitlines()[-1])
    assert md.name == "leaderboard.md" and md.is_file() and (md.parent / "sweep.png").is_file()
    board = json.loads((md.parent / "leaderboard.json").read_text())
    assert not board["incomplete"] and len(board["rows"]) == 2 and board["family_size"] == 2
    assert all(r["n"] == 12 for r in board["rows"])
    unique, built, reused = _counts(p1.stderr)
    assert built == unique and reused == 0

    p2 = _run(camp, store)
    assert _counts(p2.stderr) == (unique, 0, unique)
    assert p2.stdout.strip().splitlines()[-1] == str(md)

    p3 = _run(_campaign(tmp_path / "c.yaml", "[5.0e-6, 5.0e-5, 1.0e-4]"), store)
    unique3, built3, reused3 = _counts(p3.stderr)
    # the new member's own units: train-grpo, select-checkpoint, convert, 2 shots x 2 shards of
    # selector inference, summarize
    assert built3 == 1 + 1 + 1 + 4 + 1 and reused3 == unique
    assert "plan5 grpo.lr=0.0001: built 8" in " ".join(p3.stderr.split())
