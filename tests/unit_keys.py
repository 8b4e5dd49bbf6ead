"""The unit keys of the shipped plans, as a committed record (`tests/data/unit_keys.json`).

Why: a store is reused only as far as its keys match.  A refactoring (moves, renames, typing)
must leave every key unchanged, so that a store built before it is still fully reused after it; a
change that alters what a stage writes bumps that stage's ``version`` on purpose, and then this
record is rewritten with ``python tests/unit_keys.py --write`` in the same commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RECORD = Path(__file__).parent / "data" / "unit_keys.json"
#: (profile, plan): the plans whose stores matter most, on both profiles
CASES = (("tiny", "baseline"), ("tiny", "plan5"), ("tiny", "plan5_online"), ("tiny", "plan10"),
         ("cluster", "plan5"))


def current_keys() -> dict[str, dict[str, str]]:
    from lever.config import load_plan
    from lever.pipeline.hashing import plan_keys
    from lever.pipeline.runner import load_baseline

    out: dict[str, dict[str, str]] = {}
    for profile, name in CASES:
        plan = load_plan(name, profile, [])
        base = load_baseline(plan, profile, [])
        base_keys = plan_keys(base) if base is not None else None
        keys = plan_keys(plan, baseline_keys=base_keys)
        out[f"{profile}/{name}"] = {f"{stage}/{unit.id}": h for stage, units in keys.units.items() for unit, h in units}
    return out


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/unit_keys.py --write")
    RECORD.write_text(json.dumps(current_keys(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORD}")
