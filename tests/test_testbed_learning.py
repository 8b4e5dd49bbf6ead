"""The tiny testbed tells a working selector from a broken one (end to end, on report.json).

One store holds the real tiny plan5 run (with its baseline, RCE only, and the random, retrieval
and oracle references) and an ablation plan trained on negated rewards.  Each claim is a
function of a report, checked on hand-made reports below (true and false cases, so a claim that
could never fail is caught), and on real broken runs in the closing note of issue 13 (an untrained
selector beats random at no shot and does not rise with shots; the harmful plan without the
negation is no regression).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HARMFUL = """\
name: harmful
extends: baseline
description: ablation - RCE on negated rewards, trained four times longer
reward: {negate: true}
rce: {epochs: 20}
baseline_plan: baseline
"""


def _lever(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lever.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


def _report(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    path = Path(out.stdout.strip().splitlines()[-1])
    return json.loads(path.with_name("report.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("testbed")
    store = root / "store"
    plan5 = _report(_lever("run", "plan5", "--profile", "tiny", "--store", str(store), cwd=root))
    (root / "harmful.yaml").write_text(HARMFUL)
    harmful = _report(_lever("run", str(root / "harmful.yaml"), "--profile", "tiny", "--store", str(store), cwd=root))
    return root, plan5, harmful


# -- the claims, as functions of a report (so that each can be shown to fail) -------------------

def beats(rep: dict, row: str, ref: str) -> list[int]:
    """Shots where ``row`` is above ``ref`` with a paired interval that excludes 0."""
    entries = rep["reference_comparison"][row][ref]
    return [e["shot"] for e in entries if e["paired"] and e["paired"]["low"] > 0]


def gap(rep: dict, row: str, ref: str, shot: int) -> float:
    return rep["accuracy"][row][str(shot)] - rep["accuracy"][ref][str(shot)]


def rises(acc: dict[str, float], lo: int, hi: int) -> bool:
    return acc[str(hi)] > acc[str(lo)]


def test_the_claims_can_fail():
    """The claim functions on hand-made reports: each returns False on a report where the claim
    does not hold (an interval touching 0, an equal gap, a flat or falling row)."""
    def ref(lows):
        return {"reference_comparison": {"baseline": {"random": [
            {"shot": s, "paired": None if lo is None else {"low": lo}} for s, lo in enumerate(lows, 1)]}}}

    assert beats(ref([0.5, 0.1, None, -0.2]), "baseline", "random") == [1, 2]
    assert beats(ref([0.0, -1.0, None, -0.2]), "baseline", "random") == []
    acc = {"accuracy": {"oracle": {"1": 52.0}, "random": {"1": 32.0}}}
    assert gap(acc, "oracle", "random", 1) == 20.0 and gap(acc, "random", "random", 1) == 0.0
    assert rises({"1": 40.0, "4": 41.0}, 1, 4)
    assert not rises({"1": 40.0, "4": 40.0}, 1, 4) and not rises({"1": 41.0, "4": 40.0}, 1, 4)


# -- tests --------------------------------------------------------------------------------------

def test_oracle_bounds_random_by_twenty_points_at_one_shot(runs):
    _, rep, _ = runs
    assert gap(rep, "oracle", "random", 1) >= 20.0, rep["accuracy"]


def test_rce_selector_beats_random_with_an_interval_excluding_zero(runs):
    _, rep, _ = runs
    shots = beats(rep, "baseline", "random")
    assert len(shots) >= 2, rep["reference_comparison"]["baseline"]["random"]


def test_accuracy_rises_with_shots(runs):
    _, rep, _ = runs
    acc = rep["accuracy"]
    # the oracle: more demonstrations of the query's colour outvote the noisy ones
    assert rises(acc["oracle"], 1, 4), acc["oracle"]
    # trained selectors: from one shot to four (not at every step: see README, "The tiny testbed")
    assert rises(acc["baseline"], 1, 4) and rises(acc["plan"], 1, 4), (acc["baseline"], acc["plan"])


def test_harmful_training_signal_ends_below_the_baseline_and_regress_says_so(runs):
    root, plan5, harmful = runs
    assert harmful["average_diff"] < 0
    assert harmful["regression"]["detected"], harmful["regression"]
    report = root / "harmful-report.json"
    report.write_text(json.dumps(harmful))
    out = _lever("regress", "--plan", "harmful", "--baseline", "baseline", "--report", str(report),
                 "--margin", "1.5", "--rule", "strict", "--pushgateway", "", cwd=root)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "REGRESSION" in out.stdout
    # plan5's own report is no regression against the same baseline
    ok = root / "plan5-report.json"
    ok.write_text(json.dumps(plan5))
    out = _lever("regress", "--plan", "plan5", "--baseline", "baseline", "--report", str(ok),
                 "--margin", "1.5", "--rule", "strict", "--pushgateway", "", cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr


def test_report_states_what_it_can_conclude(runs):
    _, rep, _ = runs
    con = rep["conclusions"]
    assert [e["shot"] for e in con["per_shot"]] == rep["shots"]
    for e in con["per_shot"]:
        assert e["n"] == rep["n"]["plan"][str(e["shot"])] > 0
        assert e["ci_width"] is not None and e["detectable_difference"] > 0


# -- online GRPO (issue 17) ---------------------------------------------------------------------

def _online_grpo(root: Path, *overrides: str) -> list[dict]:
    """train-grpo of plan5_online on this store (everything upstream is plan5's, already built)."""
    sets = [a for o in ("grpo.epochs=6", *overrides) for a in ("--set", o)]
    out = _lever("stage", "train-grpo", "--plan", "plan5_online", "--profile", "tiny", "--store",
                 str(root / "store"), *sets, cwd=root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    found = re.findall(r"train-grpo \S+: (?:built|cached) (\S+)", out.stdout + out.stderr)
    assert found, out.stdout[-2000:] + out.stderr[-2000:]
    d = Path(found[-1])
    info = json.loads((d / "grpo_info.json").read_text())
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    return [{"epoch": 0, "heldout_reward": info["heldout_reward_start"]}] + rows


def heldout_rises(rows: list[dict], margin: float = 0.02) -> bool:
    """The policy's own held-out samples (same draws every epoch) earn more reward over its last
    three epochs than the starting policy's did."""
    last = [r["heldout_reward"] for r in rows[-3:]]
    return sum(last) / len(last) > rows[0]["heldout_reward"] + margin


def test_online_grpo_raises_the_heldout_reward_of_its_own_samples(runs):
    root = runs[0]
    rows = _online_grpo(root)
    assert [r["epoch"] for r in rows] == list(range(7))
    assert heldout_rises(rows), [round(r["heldout_reward"], 4) for r in rows]
    for r in rows[1:]:  # the rollouts ran on the LVLM and the cache
        assert r["rollout_sequences"] == 64 * 8 and r["judged_new"] + r["judged_cached"] > 0
        assert r["lvlm_calls"] > 0 and r["judge_seconds"] > 0 and 0 <= r["zero_std_frac"] <= 1
    # the same check fails when the policy cannot move (lr ~ 0): its held-out samples stay the same
    frozen = _online_grpo(root, "grpo.lr=1e-12")
    assert not heldout_rises(frozen), [r["heldout_reward"] for r in frozen]
