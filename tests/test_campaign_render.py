"""The campaign as ONE Argo Workflow: closed v4.1.2 / v3.7.18 schemas, each shared unit once."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from lever.campaign.loader import CampaignError, load_and_resolve, load_campaign
from lever.pipeline.graph import STAGES
from lever.pipeline.hashing import plan_keys
from lever.pipeline.runner import stage_closure
import manifest_validation as validation
from lever.platform import render
from lever.platform.campaign import (CAMPAIGN_PATH, LEADERBOARD, build_campaign_cron, build_campaign_workflow,
                                     plan_tasks)

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ("v4.1.2", "v3.7.18")


def _all_keys(runs) -> set[str]:
    """Every unit the campaign needs: each member's whole graph and its baseline's reads."""
    base_reads = stage_closure([n for s in STAGES if s.with_baseline for n in s.inputs])
    keys = set()
    for _, _, plan, base in runs:
        bk = plan_keys(base, STAGES)
        pk = plan_keys(plan, STAGES, bk)
        keys |= {f"{s}/{h}" for s in base_reads for _, h in bk.units[s]}
        keys |= {f"{s.name}/{h}" for s in STAGES for _, h in pk.units[s.name]}
    return keys


@pytest.mark.parametrize("name", ["grpo_sweep", "seeds"])
def test_campaign_workflow_validates_and_holds_each_unit_once(shared, name):
    camp, runs = load_and_resolve(ROOT / "campaigns" / f"{name}.yaml", "cluster")
    tasks = plan_tasks(camp, runs)
    owned = [k for t in tasks for k in t.unit_keys]
    assert len(owned) == len(set(owned)), "a unit is scheduled by two tasks"
    assert set(owned) == _all_keys(runs)
    wf = build_campaign_workflow(camp, runs, render.cluster_platform(), "cluster")
    (doc,) = validation.load_documents(render.to_yaml(wf))
    for version in VERSIONS:
        assert validation.validate_argo(doc, shared, version) == [], version
    assert validation.structural_problems(doc) == []
    dag = next(t for t in doc["spec"]["templates"] if t["name"] == "campaign")["dag"]["tasks"]
    by_stage = Counter(t["templateRef"]["template"] for t in dag if "templateRef" in t)
    # the shared upstream stages appear once for the whole campaign; a stage some plans configure
    # differently (plan7's balanced RL data, plan10's RCE) once per distinct configuration
    for stage in ("prepare-data", "export-embeddings", "generate-beams", "train-v2"):
        assert by_stage[f"stage-{stage}"] == 1, (stage, by_stage)
    for stage in ("generate-rl-data", "train-rce"):
        distinct = {plan_keys(c, STAGES).stage_hash[stage] for _, _, p, b in runs for c in (p, b)}
        assert by_stage[f"stage-{stage}"] == len(distinct), (stage, by_stage)
    items = Counter(i for t in dag if t.get("templateRef", {}).get("template") == "stage-generate-beams"
                    for i in t["withItems"])
    assert len(items) == runs[0][2].beam.shards and set(items.values()) == {1}
    # members fan out as branches: one summarize per member, all below the one leaderboard step
    assert by_stage["stage-summarize"] == len(camp.members)
    lb = next(t for t in dag if t["name"] == LEADERBOARD)
    assert len(lb["dependencies"]) == len(camp.members)
    names = {t["name"] for t in dag}
    assert all(d in names for t in dag for d in t.get("dependencies", []))


def test_seeds_campaign_shares_rce_between_plans_that_share_its_settings(shared):
    camp, runs = load_and_resolve(ROOT / "campaigns" / "seeds.yaml", "cluster")
    tasks = plan_tasks(camp, runs)
    rce = {k for t in tasks for k in t.unit_keys if k.startswith("train-rce/")}
    distinct = {f"train-rce/{h}" for _, _, p, b in runs for c in (p, b) for _, h in plan_keys(c, STAGES).units["train-rce"]}
    assert rce == distinct and len(rce) < len(camp.members)  # plan1..plan7_2 reuse the baseline's RCE


def test_leaderboard_step_carries_the_campaign_and_the_pods_can_read_it(tmp_path, shared):
    camp, runs = load_and_resolve(ROOT / "campaigns" / "grpo_sweep.yaml", "cluster")
    doc = yaml.safe_load(render.to_yaml(build_campaign_workflow(camp, runs, render.cluster_platform(), "cluster")))
    tpl = next(t for t in doc["spec"]["templates"] if t["name"] == LEADERBOARD)
    art = tpl["inputs"]["artifacts"][0]
    assert art["path"] == CAMPAIGN_PATH and tpl["container"]["args"][:3] == ["campaign", "report", CAMPAIGN_PATH]
    copy = tmp_path / "campaign.yaml"
    copy.write_text(art["raw"]["data"])
    again = load_campaign(copy)
    assert [m.name for m in again.members] == [m.name for m in camp.members]
    assert again.config == camp.config
    assert doc["spec"]["onExit"] == "exit-handler"


def test_nightly_campaign_cron_validates_and_fails_on_regression(shared):
    camp, runs = load_and_resolve(ROOT / "campaigns" / "grpo_sweep.yaml", "cluster")
    (doc,) = validation.load_documents(render.to_yaml(build_campaign_cron(camp, runs, render.cluster_platform(), "cluster")))
    for version in VERSIONS:
        assert validation.validate_argo(doc, shared, version) == [], version
    assert doc["kind"] == "CronWorkflow" and doc["metadata"]["name"] == "lever-nightly"
    tpl = next(t for t in doc["spec"]["workflowSpec"]["templates"] if t["name"] == LEADERBOARD)
    assert "--fail-on-regression" in tpl["container"]["args"]
    # the default nightly (committed, checked for drift elsewhere) still runs plan5 vs the baseline
    default = yaml.safe_load((ROOT / "workflows" / "nightly-cron.yaml").read_text())
    params = {p["name"]: p.get("value") for p in default["spec"]["workflowSpec"]["arguments"]["parameters"]}
    assert params["plan"] == "plan5" and params["baseline"] == "baseline"


def test_render_refuses_plans_the_pods_do_not_have(tmp_path):
    plan = tmp_path / "myplan.yaml"
    plan.write_text("name: myplan\nextends: plan5\ngrpo: {lr: 1.0e-6}\n")
    camp_file = tmp_path / "c.yaml"
    camp_file.write_text(f"name: t\nplans: [{plan}]\n")
    camp, runs = load_and_resolve(camp_file, "cluster")
    with pytest.raises(CampaignError, match="not a shipped plan"):
        build_campaign_workflow(camp, runs, render.cluster_platform(), "cluster")
    res = subprocess.run([sys.executable, "-m", "lever", "campaign", "render", str(camp_file)], capture_output=True, text=True)
    assert res.returncode == 2 and "not a shipped plan" in res.stderr
