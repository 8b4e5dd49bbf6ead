"""Campaign files: closed schema with file:line errors, sweep expansion, members resolved up front."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lever.campaign.loader import CampaignError, load_and_resolve, load_campaign

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_shipped_campaigns_load_and_resolve():
    camp, runs = load_and_resolve(ROOT / "campaigns" / "seeds.yaml", "tiny")
    names = [m.name for m in camp.members]
    # "all shipped plans vs the baseline": every preset but the baseline itself, each once
    from lever.config.loader import list_plans

    assert sorted(names) == sorted(n for n in list_plans() if n != "baseline")
    assert all(p.baseline_plan == "baseline" and p.infer.shots == [1, 2, 3, 4] for _, _, p, _ in runs)
    camp, runs = load_and_resolve(ROOT / "campaigns" / "grpo_sweep.yaml", "tiny")
    assert len(camp.members) == 4
    lrs = sorted({p.grpo.lr for _, _, p, _ in runs})
    betas = sorted({p.grpo.kl_beta for _, _, p, _ in runs})
    assert lrs == [5e-6, 5e-5] and betas == [0.01, 0.1]
    assert all(p.grpo.epochs == 20 for _, _, p, _ in runs)


def test_sweep_grid_seeds_and_shots_expand_into_overrides(tmp_path):
    path = _write(tmp_path, """\
name: t
baseline: baseline
shots: [1, 2]
seeds: [1, 2]
set: [infer.num_samples=20]
plans: [plan1]
sweeps:
  - plan: plan5
    grid: {grpo.lr: [1.0e-6, 5.0e-6, 5.0e-5], grpo.kl_beta: [0.01, 0.1]}
""")
    camp, runs = load_and_resolve(path, "tiny")
    assert len(camp.members) == 1 + 6 and len(runs) == 14
    sweep = [m for m in camp.members if m.sweep == 0]
    assert {dict(m.swept)["grpo.lr"] for m in sweep} == {1e-6, 5e-6, 5e-5}
    for m, seed, plan, base in runs:
        assert plan.seed == seed and base.seed == seed  # a seed repeat reruns the baseline too
        assert plan.infer.num_samples == 20 and base.infer.num_samples == 20
        assert plan.infer.shots == [1, 2] and base.name == "baseline"
        if m.sweep == 0:
            assert plan.grpo.lr == dict(m.swept)["grpo.lr"] and base.grpo.epochs == 0


@pytest.mark.parametrize("text,line,what", [
    ("name: t\nplans: [plan5]\nleaderboard:\n  alpah: 0.1\n", 4, "leaderboard.alpah"),
    ("name: t\nplans: [plan5]\nsweeps:\n  - plan: plan5\n    gird: {grpo.lr: [1]}\n", 5, "sweeps.0.gird"),
    ("name: t\nplans: [plan5]\nseeds: [1, 1]\n", 3, "seeds"),
    ("name: t\nplanz: [plan5]\n", 2, "planz"),
    ("name: t\nplans: [plan5, baseline]\n", 2, "plans.1"),
])
def test_bad_campaigns_name_file_line_and_field(tmp_path, text, line, what):
    path = _write(tmp_path, text)
    with pytest.raises(CampaignError) as err:
        load_campaign(path)
    msg = str(err.value)
    assert f"{path}:{line}:" in msg and what in msg, msg


def test_repeated_member_and_invalid_grid_value_are_refused(tmp_path):
    with pytest.raises(CampaignError, match="repeats"):
        load_campaign(_write(tmp_path, "name: t\nplans: [plan5, plan5]\n"))
    path = _write(tmp_path, "name: t\nsweeps:\n  - plan: plan5\n    grid: {grpo.lr: [fast]}\n")
    with pytest.raises(CampaignError) as err:
        load_and_resolve(path, "tiny")
    assert "grpo.lr=fast" in str(err.value) and "grpo.lr" in str(err.value)


def test_cli_exits_2_on_a_bad_campaign(tmp_path):
    path = _write(tmp_path, "name: t\nplans: [plan5]\nshotz: [1]\n")
    res = subprocess.run([sys.executable, "-m", "lever", "campaign", "report", str(path), "--store", str(tmp_path / "s")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and f"{path}:3:" in res.stderr and "shotz" in res.stderr, res.stderr
