"""plan5_online and what online rollouts change in the pipeline: train-grpo reads the dataset and
the LVLM (so both join its key), offline plans keep depending on neither, and a combination the
online loop cannot run is refused when the plan loads."""

from __future__ import annotations

import pytest

from lever.config.loader import config_hash, load_plan
from lever.pipeline.graph import stage
from lever.pipeline.hashing import plan_keys


def _grpo_key(plan) -> str:
    return plan_keys(plan).units["train-grpo"][0][1]


def test_plan5_online_is_plan5_with_online_rollouts():
    off, on = load_plan("plan5", "tiny"), load_plan("plan5_online", "tiny")
    assert off.grpo.rollout == "offline" and on.grpo.rollout == "online"
    # what else differs, and why, is stated in the preset: the online learning rate and PPO updates
    # per sampled round, and the checkpoint chosen by the held-out reward of its own samples
    changed = {"rollout", "online", "lr", "updates_per_round"}
    assert on.grpo.model_dump(exclude=changed) == off.grpo.model_dump(exclude=changed)
    assert not on.recommended and on.checkpoint.strategy == "heldout_reward"
    assert on.model_dump(exclude={"name", "description", "extends", "grpo", "checkpoint", "recommended"}) == \
        off.model_dump(exclude={"name", "description", "extends", "grpo", "checkpoint", "recommended"})


def test_online_train_grpo_reads_the_dataset_and_depends_on_the_lvlm():
    st = stage("train-grpo")
    off, on = load_plan("plan5", "tiny"), load_plan("plan5_online", "tiny")
    unit = st.units(on)[0]
    assert "prepare-data" in st.inputs_for(unit, on) and "prepare-data" not in st.inputs_for(unit, off)
    assert "lvlm" in st.fields_for(on) and "lvlm" not in st.fields_for(off)
    # the config part of the key: an LVLM setting enters it only online (offline GRPO sees the LVLM
    # only through the RL data's hash); everything up to train-rce stays shared between the two
    off2, on2 = (load_plan(n, "tiny", ["lvlm.max_new_tokens=4"]) for n in ("plan5", "plan5_online"))
    assert config_hash(off2, st.fields_for(off2)) == config_hash(off, st.fields_for(off))
    assert config_hash(on2, st.fields_for(on2)) != config_hash(on, st.fields_for(on))
    assert _grpo_key(on) != _grpo_key(off)
    assert plan_keys(on).units["train-rce"] == plan_keys(off).units["train-rce"]
    # online with zero epochs trains nothing and reads nothing extra
    zero = load_plan("plan5_online", "tiny", ["grpo.epochs=0"])
    assert "lvlm" not in st.fields_for(zero)


def test_online_rollouts_refuse_the_curriculum():
    with pytest.raises(Exception, match="curriculum"):
        load_plan("plan9", "tiny", ["grpo.rollout=online"])


def _online_grpo_dir(tmp_path, rollout: str = "online"):
    import json

    d = tmp_path / "train-grpo"
    d.mkdir()
    (d / "grpo_info.json").write_text(json.dumps({"rollout": rollout, "heldout_reward_start": 0.8,
                                                  "heldout_correct_start": 0.4, "judge_cache": "ns1"}))
    rows = [{"epoch": 1, "heldout_reward": 0.85, "rollout_reward": 0.9, "judged_new": 300, "judged_cached": 10,
             "lvlm_calls": 120, "judge_seconds": 1.5, "optimize_seconds": 0.5, "zero_std_frac": 0.5},
            {"epoch": 2, "heldout_reward": 0.93, "rollout_reward": 0.7, "judged_new": 100, "judged_cached": 210,
             "lvlm_calls": 40, "judge_seconds": 0.5, "optimize_seconds": 0.5, "zero_std_frac": 0.25}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_report_shows_the_online_rollouts_and_offline_reports_do_not(tmp_path):
    from lever.context import UpstreamOutput
    from lever.context import Unit
    from lever.report.build import online_rollouts
    from lever.report.plots import write_plots
    from lever.report.render import _online

    d = _online_grpo_dir(tmp_path)
    on = online_rollouts({"train-grpo": UpstreamOutput("train-grpo", [(Unit("train-grpo"), d)])})
    assert on["start"]["heldout_reward"] == 0.8 and [e["heldout_reward"] for e in on["epochs"]] == [0.85, 0.93]
    assert on["epochs"][1]["judged_cached"] == 210 and on["judge_cache"] == "ns1"
    text = "\n".join(_online(on))
    assert "| 0 | 0.8000 | 0.400 |" in text
    assert "| 2 | 0.9300 |" in text and "| 100 | 210 | 40 | 0.5 | 0.5 |" in text
    made = write_plots({"shots": [1], "accuracy": {}, "comparison": [], "plan": "p", "online_rollouts": on,
                        "bootstrap": {"confidence": 0.95}}, [], tmp_path / "plots")
    assert "plots/online.png" in made and (tmp_path / "plots" / "online.png").stat().st_size > 0
    (d / "grpo_info.json").write_text('{"start": "rce_epoch5"}')  # offline GRPO: no section
    assert online_rollouts({"train-grpo": UpstreamOutput("train-grpo", [(Unit("train-grpo"), d)])}) is None
    assert _online(None) == []


def test_online_metrics_are_exported_as_gauges():
    from lever.obs.telemetry import Telemetry

    tel = Telemetry("plan5_online", "r1", "train-grpo", None)
    tel.epoch("grpo", 1, {"heldout_reward": 0.93, "rollout_reward": 0.7, "judged_new": 100, "judged_cached": 210,
                          "lvlm_calls": 40, "judge_seconds": 0.5, "optimize_seconds": 0.25, "zero_std_frac": 0.5})
    base = {"plan": "plan5_online", "run_id": "r1", "stage": "train-grpo", "phase": "grpo"}
    get = lambda n, **l: tel.registry.get_sample_value(n, {**base, **l})  # noqa: E731
    assert get("lever_train_heldout_reward") == 0.93 and get("lever_train_rollout_reward") == 0.7
    assert get("lever_train_judgements", source="new") == 100 and get("lever_train_judgements", source="cache") == 210
    assert get("lever_train_lvlm_calls") == 40 and get("lever_train_zero_std_group_ratio") == 0.5
    assert get("lever_train_seconds", part="judge") == 0.5 and get("lever_train_seconds", part="optimize") == 0.25
