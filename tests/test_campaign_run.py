"""``lever campaign run`` on the real graph shape with fake stage functions (test_runner_fakes):
shared units built once, a rerun fully cached, one more grid value builds only the new member."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lever.campaign.loader import load_and_resolve
from lever.campaign.run import run_campaign
from lever.storage.store import LocalStore
from test_runner_fakes import fake_stages, read_log

SMALL = '["infer.num_samples=20", "infer.shards=2", "report.bootstrap_samples=200"]'


def _campaign(tmp_path: Path, lrs: str) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(f"""\
name: fake-sweep
baseline: baseline
shots: [1, 2]
set: {SMALL}
leaderboard: {{bootstrap_samples: 200, permutations: 2000}}
sweeps:
  - plan: plan5
    grid: {{grpo.lr: {lrs}, grpo.kl_beta: [0.01, 0.1]}}
""")
    return p


def test_campaign_shares_units_reruns_cached_and_grows_by_one_member(tmp_path, fake_log):
    store = LocalStore(tmp_path / "store")
    camp, runs = load_and_resolve(_campaign(tmp_path, "[1.0e-6, 5.0e-6]"), "tiny")
    s1 = run_campaign(camp, runs, store, stages=fake_stages(), jobs=1)
    calls = read_log(fake_log)
    per_stage = Counter(c[1] for c in calls)
    # everything upstream of GRPO is one artifact for the baseline and all four members
    for stage in ("prepare-data", "export-embeddings", "train-v2", "train-rce"):
        assert per_stage[stage] == 1, (stage, per_stage)
    assert per_stage["generate-beams"] == 2 and per_stage["generate-rl-data"] == 2  # two shards, once
    assert per_stage["train-grpo"] == 1 + 4  # the baseline's (0 epochs) and one per member
    # every stage call built a distinct unit (nothing built twice); summarize is the real, unlogged one
    assert len(calls) == s1.built - 4
    assert s1.shared >= 20 and s1.reused == 0 and s1.unique == s1.built
    assert s1.board is not None and not s1.board["incomplete"] and len(s1.board["rows"]) == 4
    md = Path(s1.leaderboard)
    assert md.is_file() and (md.parent / "leaderboard.json").is_file() and (md.parent / "sweep.png").is_file()
    text = md.read_text()
    assert "Holm" in text and "plan5 grpo.lr=1e-06 grpo.kl_beta=0.01" in text

    s2 = run_campaign(camp, runs, store, stages=fake_stages(), jobs=1)
    assert read_log(fake_log) == calls and s2.built == 0 and s2.reused == s1.unique
    assert s2.status == "cached" and s2.leaderboard == s1.leaderboard

    camp3, runs3 = load_and_resolve(_campaign(tmp_path, "[1.0e-6, 5.0e-6, 5.0e-5]"), "tiny")
    s3 = run_campaign(camp3, runs3, store, stages=fake_stages(), jobs=1)
    new = read_log(fake_log)[len(calls):]
    assert new and {c[0] for c in new} == {"plan5"}
    # only the two new grid points' own units: train-grpo .. infer(selector) .. summarize
    assert Counter(c[1] for c in new)["train-grpo"] == 2
    assert not {c[1] for c in new} & {"prepare-data", "generate-beams", "generate-rl-data", "train-rce", "train-v2"}
    assert s3.built == len(new) + 2 and s3.reused == s3.unique - s3.built  # + the two summarize units
    board = json.loads((Path(s3.leaderboard).parent / "leaderboard.json").read_text())
    assert len(board["rows"]) == 6 and board["family_size"] == 6


def test_report_before_the_run_lists_every_member_as_missing(tmp_path):
    from lever.campaign.report import write_leaderboard

    store = LocalStore(tmp_path / "store")
    camp, runs = load_and_resolve(_campaign(tmp_path, "[1.0e-6]"), "tiny")
    key, board, status = write_leaderboard(camp, runs, store, run_id="r1")
    assert status == "partial" and key == "partial/campaign-fake-sweep/r1"
    assert len(board["incomplete"]) == 2 and board["best"] is None
    assert "## Missing" in (store.open(key) / "leaderboard.md").read_text()


def test_seed_repeats_run_member_and_baseline_per_seed(tmp_path, fake_log):
    p = tmp_path / "seeds.yaml"
    p.write_text(f"name: s\nshots: [1, 2]\nseeds: [1, 2]\nset: {SMALL}\nplans: [plan5]\n"
                 "leaderboard: {bootstrap_samples: 200, permutations: 2000}\n")
    camp, runs = load_and_resolve(p, "tiny")
    s = run_campaign(camp, runs, LocalStore(tmp_path / "store"), stages=fake_stages(), jobs=1)
    calls = read_log(fake_log)
    # the seed is in the keys of everything seeded: two baselines, two RCE, two beams per shard
    assert Counter(c[1] for c in calls)["train-rce"] == 2 and Counter(c[1] for c in calls)["generate-beams"] == 4
    (row,) = s.board["rows"]
    assert row["complete"] and [x["seed"] for x in row["per_seed"]] == [1, 2]
    assert row["seed_spread"]["diff_sd"] is not None
    assert "seed sd" in Path(s.leaderboard).read_text()
