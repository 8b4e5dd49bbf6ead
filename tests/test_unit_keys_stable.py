"""A store built before a refactoring is still fully reused after it: every unit key of the
shipped plans equals the committed record (see tests/unit_keys.py for when to rewrite it)."""

from __future__ import annotations

import json

from unit_keys import RECORD, current_keys


def test_unit_keys_of_shipped_plans_are_unchanged():
    recorded = json.loads(RECORD.read_text())
    now = current_keys()
    assert set(now) == set(recorded)
    for case, keys in now.items():
        changed = {u: (recorded[case].get(u), k) for u, k in keys.items() if recorded[case].get(u) != k}
        gone = sorted(set(recorded[case]) - set(keys))
        assert not changed and not gone, (
            f"{case}: unit keys changed {changed} / units gone {gone}: a store built before this change would "
            "be rebuilt. If a stage's output really changed, bump its version and run "
            "`python tests/unit_keys.py --write`.")


def test_the_record_catches_a_changed_key():
    """The check above can fail: a bumped stage version changes that stage's key (and, through
    its hash, every key after it) while the stages before it keep theirs."""
    import dataclasses

    from lever.config import load_plan
    from lever.pipeline.graph import STAGES
    from lever.pipeline.hashing import plan_keys

    bumped = tuple(dataclasses.replace(s, version=s.version + 1) if s.name == "train-grpo" else s for s in STAGES)
    keys = plan_keys(load_plan("plan5", "tiny", []), bumped)
    recorded = json.loads(RECORD.read_text())["tiny/plan5"]
    assert keys.units["train-grpo"][0][1] != recorded["train-grpo/all"]
    assert keys.units["select-checkpoint"][0][1] != recorded["select-checkpoint/all"]
    rl_unit, rl_key = keys.units["generate-rl-data"][0]
    assert rl_key == recorded[f"generate-rl-data/{rl_unit.id}"]
