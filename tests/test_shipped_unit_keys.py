"""The unit keys of every shipped plan (tiny and cluster profiles) equal the recorded ones.

A refactoring that moves code or retypes config must leave every key as it was, or a store built
before it is no longer reused (issue 18).  ``tests/data/shipped_unit_keys.json`` holds the keys
``lever run PLAN --profile P --dry-run`` listed before issue 18's changes; a deliberate key change
(a new stage version, a new field in a hashed section) regenerates it with
``python tests/test_shipped_unit_keys.py`` and says so in its commit.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "data" / "shipped_unit_keys.json"
PROFILES = ("tiny", "cluster")


def dry_run_keys(plan: str, profile: str, store: Path) -> dict[str, str]:
    """``"stage unit" -> key`` as ``lever run --dry-run`` lists them (the baseline plan's units too)."""
    from lever.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main(["run", plan, "--profile", profile, "--dry-run", "--store", str(store)])
        except SystemExit as exc:
            assert not exc.code, f"lever run {plan} --profile {profile} --dry-run exited {exc.code}"
    out: dict[str, str] = {}
    for line in buf.getvalue().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2].startswith(parts[0] + "/"):
            out[f"{parts[0]} {parts[1]}"] = parts[2]
    assert out, f"no units listed for {plan} ({profile})"
    return out


def all_keys(store: Path) -> dict[str, dict[str, str]]:
    from lever.config import list_plans

    return {f"{plan}/{profile}": dry_run_keys(plan, profile, store) for plan in list_plans() for profile in PROFILES}


def test_shipped_plans_keep_their_unit_keys(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    now = all_keys(tmp_path / "store")
    assert sorted(now) == sorted(golden), "shipped plans changed: regenerate tests/data/shipped_unit_keys.json"
    changed = [f"{run}: {unit} {golden[run].get(unit)} -> {key}"
               for run in golden for unit, key in now[run].items() if golden[run].get(unit) != key]
    missing = [f"{run}: {unit}" for run in golden for unit in golden[run] if unit not in now[run]]
    assert not changed and not missing, "unit keys changed:\n" + "\n".join((changed + missing)[:20])


if __name__ == "__main__":  # regenerate after a deliberate key change
    with tempfile.TemporaryDirectory() as d:
        keys = all_keys(Path(d))
    GOLDEN.write_text(json.dumps(keys, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({sum(len(v) for v in keys.values())} units)")


def test_a_bumped_stage_version_is_caught():
    """The record can catch a change: bumping train-grpo's version changes its key and every key
    after it (through its hash), while the stages before it keep theirs."""
    import dataclasses

    from lever.config import load_plan
    from lever.pipeline.graph import STAGES
    from lever.pipeline.hashing import plan_keys

    bumped = tuple(dataclasses.replace(s, version=s.version + 1) if s.name == "train-grpo" else s for s in STAGES)
    keys = plan_keys(load_plan("plan5", "tiny", []), bumped)
    recorded = json.loads(GOLDEN.read_text())["plan5/tiny"]
    assert f"train-grpo/{keys.units['train-grpo'][0][1]}" != recorded["train-grpo all"]
    assert f"select-checkpoint/{keys.units['select-checkpoint'][0][1]}" != recorded["select-checkpoint all"]
    rl_unit, rl_key = keys.units["generate-rl-data"][0]
    assert f"generate-rl-data/{rl_key}" == recorded[f"generate-rl-data {rl_unit.id}"]
