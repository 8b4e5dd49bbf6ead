"""What a stage function receives: the contract between the stages and the executors.

It sits at the bottom of the package (beside ``errors``) so that stage functions, the report code
that reads upstream artifacts and the pipeline that builds them all import it downward.

A stage is ``def stage(ctx: StageContext) -> None``: it reads ``ctx.inputs`` (local directories
of finished upstream artifacts) and writes files into ``ctx.out``.  ``ctx.out`` is a staging
directory owned by the store: it survives a kill (so a stage may resume from what it finds
there) and becomes visible under the artifact's final key only when the stage returns and the
store commits it atomically.  The same call is made by ``lever stage``, the local runner and the
Argo container.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lever.config.schema import PlanConfig
from lever.errors import StageError


@dataclass(frozen=True)
class Unit:
    """One independently stored piece of a stage's output (the whole stage, a shard, or a
    (variant, shot, shard) inference job).  ``params`` become part of the artifact key."""

    stage: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def id(self) -> str:
        if not self.params:
            return "all"
        return "-".join(f"{k}{v}" for k, v in self.params)

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    # typed views of the parameters the graph gives fanned-out units (shard units: shard, of;
    # inference units: variant, shot, shard, of), so stage code never casts them itself
    @property
    def shard(self) -> int:
        """This unit's shard index (0 for a stage that is not sharded)."""
        return int(self.get("shard", 0))

    @property
    def of(self) -> int:
        """How many shards the stage has (1 when not sharded)."""
        return int(self.get("of", 1))

    @property
    def variant(self) -> str:
        """An inference unit's variant (selector, epoch{N}, random, retrieval, oracle)."""
        return str(self._required("variant"))

    @property
    def shot(self) -> int:
        """An inference unit's number of ICDs."""
        return int(self._required("shot"))

    def _required(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(f"unit {self.stage}/{self.id} has no {key}")
        return value


@dataclass
class UpstreamOutput:
    """All committed units of one upstream stage, in unit order (shard 0, 1, ...)."""

    stage: str
    units: list[tuple[Unit, Path]]
    hash: str = ""

    @property
    def path(self) -> Path:
        """The single directory of a non-fanned-out stage."""
        if len(self.units) != 1:
            raise StageError(f"stage {self.stage!r} has {len(self.units)} units; iterate .units instead")
        return self.units[0][1]

    def paths(self) -> list[Path]:
        return [p for _, p in self.units]

    def find(self, **params: Any) -> list[tuple[Unit, Path]]:
        return [(u, p) for u, p in self.units if all(u.get(k) == v for k, v in params.items())]


class _NullTelemetry:
    """Used when no metrics backend is configured: every hook is a no-op."""

    def __getattr__(self, name: str):
        return lambda *a, **k: None


@dataclass
class StageContext:
    plan: PlanConfig
    stage: str
    unit: Unit
    inputs: dict[str, UpstreamOutput]
    out: Path
    run_id: str = "local"
    # extra upstream outputs from the baseline plan (summarize only): same keys as inputs
    baseline_inputs: dict[str, UpstreamOutput] = field(default_factory=dict)
    telemetry: Any = field(default_factory=_NullTelemetry)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("lever.stage"))
    config_hash: str = ""
    # the resolved baseline plan (summarize only; None when the plan has no baseline)
    baseline_plan: Optional[PlanConfig] = None
    # set by ``lever report`` after a failure: some upstream units are absent and ``missing``
    # names them ("stage/unit-id", "baseline:stage/unit-id"); the stage writes what it can
    partial: bool = False
    missing: list[str] = field(default_factory=list)
    # the artifact store the unit is built in (None when a stage function is called directly):
    # stages that keep shared caches beside their artifacts (online GRPO's judged sequences) use it
    store: Any = None

    def input(self, name: str) -> UpstreamOutput:
        try:
            return self.inputs[name]
        except KeyError:
            raise StageError(f"stage {self.stage!r} needs upstream {name!r}, which was not provided") from None

    def optional_input(self, name: str) -> Optional[UpstreamOutput]:
        return self.inputs.get(name)
