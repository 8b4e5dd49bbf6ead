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
