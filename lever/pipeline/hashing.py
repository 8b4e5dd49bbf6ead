"""Content addresses of stage units.

Why a separate module: the key of an artifact must be computable from the plan configs alone,
before anything runs, so that ``lever stage --list-units``, the Argo renderer, ``lever compare``
and the cache check all agree without touching the store.  The key of a unit is the hash of

* the config fields its stage depends on (``Stage.config_fields`` in ``graph.py``),
* the *stage hashes* of the upstream stages this unit really reads (``Stage.inputs_for``),
* the unit's own parameters (shard, shot, variant, ...),
* for stages with ``with_baseline`` (summarize): the baseline plan's stage hashes,
* the stage's code version (``Stage.version``) once it is bumped past 1.

A stage hash (what a downstream stage depends on) is the hash of all its unit hashes.  Nothing
plan-specific leaks in unless the stage asks for it, so two plans differing only in GRPO settings
share every artifact up to ``train-rce``, and the random/retrieval inference units of all plans
are one artifact each.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

from lever.config.loader import config_hash
from lever.config.schema import PlanConfig
from lever.context import Unit
from lever.pipeline.graph import STAGES, Stage

#: bump when the key recipe or the manifest layout changes incompatibly (old artifacts are then
#: simply not found, never misread)
STORE_SCHEMA = 1


@dataclass
class PlanKeys:
    """Every unit key of one plan: ``units[stage] = [(unit, hash), ...]`` in unit order."""

    plan: str
    units: dict[str, list[tuple[Unit, str]]] = field(default_factory=dict)
    stage_hash: dict[str, str] = field(default_factory=dict)

    def hash_of(self, stage: str, unit: Unit) -> str:
        for u, h in self.units[stage]:
            if u == unit:
                return h
        raise KeyError(f"stage {stage!r} has no unit {unit.id!r} in plan {self.plan!r}")

    def key_of(self, stage: str, unit: Unit) -> str:
        return artifact_key(stage, self.hash_of(stage, unit))


def artifact_key(stage: str, unit_hash: str) -> str:
    """Store key (a relative path) of one unit's artifact."""
    return f"{stage}/{unit_hash}"


def _digest(obj: object) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan_keys(
    plan: PlanConfig,
    stages: Sequence[Stage] = STAGES,
    baseline_keys: Optional[PlanKeys] = None,
) -> PlanKeys:
    """Compute the key of every unit of every stage of ``plan``.

    ``stages`` must be topologically ordered (each input named before its reader); the shipped
    graph is, and an injected test graph gets a clear error if not.
    """
    keys = PlanKeys(plan.name)
    for st in stages:
        unit_list: list[tuple[Unit, str]] = []
        for unit in st.units(plan):
            inputs = {}
            for name in st.inputs_for(unit, plan):
                if name not in keys.stage_hash:
                    raise ValueError(f"stage {st.name!r} reads {name!r}, which is not defined before it in the graph")
                inputs[name] = keys.stage_hash[name]
            extra: dict = {
                "schema": STORE_SCHEMA,
                "stage": st.name,
                "unit": [[k, v] for k, v in unit.params],
                "inputs": inputs,
            }
            if st.version != 1:  # version 1 adds nothing, so keys from before versions existed stay valid
                extra["version"] = st.version
            if getattr(st, "with_baseline", False):
                extra["baseline"] = (
                    {n: baseline_keys.stage_hash.get(n) for n in st.inputs} if baseline_keys is not None else None
                )
            unit_list.append((unit, config_hash(plan, st.fields_for(plan), extra)))
        keys.units[st.name] = unit_list
        keys.stage_hash[st.name] = _digest([h for _, h in unit_list])
    return keys


def full_config_hash(plan: PlanConfig) -> str:
    """Hash of the whole resolved plan, recorded in manifests for provenance (not for lookup)."""
    return _digest(plan.model_dump(mode="json"))
