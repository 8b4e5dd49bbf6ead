"""Plan presets, inheritance, profiles and the errors a typo gets."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lever.config import PlanError, config_hash, list_plans, load_plan

SPEC_PLANS = {"baseline", "v2", "plan1", "plan2", "plan3", "plan4", "plan5", "plan6", "plan7",
              "plan7_1", "plan7_2", "plan5_8", "plan9", "plan10"}
#: plans shipped beyond SPEC's table (issue 17: plan5 with online rollouts)
EXTRA_PLANS = {"plan5_online"}


def test_all_fourteen_plans_ship_and_resolve_on_both_profiles():
    assert set(list_plans()) == SPEC_PLANS | EXTRA_PLANS
    for name in SPEC_PLANS | EXTRA_PLANS:
        for profile in (None, "tiny", "cluster"):
            cfg = load_plan(name, profile)
            assert cfg.name == name
            assert cfg.description


def test_inheritance_chain_values():
    p5 = load_plan("plan5")
    assert p5.grpo.epochs == 50 and p5.grpo.rank_advantage is False and p5.grpo.kl_beta == 0.1
    assert p5.checkpoint.strategy == "val_loss"
    p6 = load_plan("plan6")
    assert p6.grpo.lr == 5e-5 and p6.grpo.epochs == 50 and p6.grpo.kl_beta == 0.1
    p71 = load_plan("plan7_1")
    assert p71.grpo.kl_beta == 0.01 and p71.rl_data.balanced.enabled
    p58 = load_plan("plan5_8")
    assert (p58.reward.mode, p58.reward.soft_weight, p58.reward.rel_weight) == ("hard_plus_gtprob_plus_rel", 0.5, 0.2)
    assert p58.grpo.lr == 1e-6 and p58.grpo.kl_beta == 0.5
    base = load_plan("baseline")
    assert base.grpo.epochs == 0 and base.rce.epochs == 5 and base.rce.lr == 1e-4
    p10 = load_plan("plan10")
    assert (p10.rce.epochs, p10.rce.tau_start, p10.rce.tau_end, p10.rce.lr) == (10, 1.0, 0.1, 5e-5)
    assert load_plan("plan3").grpo.freeze_backbone is False
    assert load_plan("plan9").grpo.curriculum.enabled


def test_profiles_overlay():
    tiny = load_plan("plan5", "tiny")
    assert tiny.lvlm.kind == "tiny_qwen2_5_vl" and tiny.data.dataset == "synthetic"
    assert tiny.grpo.epochs == 50  # the plan's own settings survive the profile
    cluster = load_plan("plan5", "cluster")
    assert cluster.lvlm.name == "Qwen/Qwen2.5-VL-3B-Instruct" and cluster.encoder.name.endswith("clip-vit-base-patch32")


def test_unknown_key_names_field_and_file(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("name: typo\ngrpo: {kl_betta: 0.1}\n")
    with pytest.raises(PlanError) as err:
        load_plan(str(bad))
    assert "grpo.kl_betta" in str(err.value) and str(bad) in str(err.value)


def test_wrong_type_and_missing_parent(tmp_path):
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("name: wrong\nrce: {epochs: many}\n")
    with pytest.raises(PlanError, match=r"rce\.epochs"):
        load_plan(str(wrong))
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("name: orphan\nextends: no_such_plan\n")
    with pytest.raises(PlanError, match="no_such_plan"):
        load_plan(str(orphan))


def test_override_and_hash_changes_only_with_its_fields():
    a = load_plan("plan5", "tiny")
    b = load_plan("plan5", "tiny", ["grpo.kl_beta=0.3"])
    assert b.grpo.kl_beta == 0.3
    assert config_hash(a, ["rce", "reward"]) == config_hash(b, ["rce", "reward"])
    assert config_hash(a, ["grpo"]) != config_hash(b, ["grpo"])


def test_cli_exit_codes(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("name: typo\ngrpo: {kl_betta: 0.1}\n")
    res = subprocess.run([sys.executable, "-m", "lever.cli", "plan", "show", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2 and "kl_betta" in res.stderr
    res = subprocess.run([sys.executable, "-m", "lever.cli", "plans"], capture_output=True, text=True)
    assert res.returncode == 0 and len(res.stdout.strip().splitlines()) == len(SPEC_PLANS | EXTRA_PLANS)
    res = subprocess.run([sys.executable, "-m", "lever.cli", "plan", "show", "plan5", "--profile", "tiny"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "kl_beta: 0.1" in res.stdout
