"""Reading a campaign file and expanding it into members.

Errors name the file, the line and the field (``campaigns/x.yaml:12: field 'sweeps.0.gird': ...``):
the YAML is composed once to map every key to its line, then validated by the closed pydantic
schema.  Every member's plan (and its baseline) is resolved up front, so a bad grid value fails
before anything runs -- not after the first members spent hours.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from lever.campaign.schema import CampaignConfig
from lever.config.loader import PlanError, load_plan
from lever.config.schema import PlanConfig


class CampaignError(PlanError):
    """A campaign that cannot be loaded; a PlanError so the CLI exits 2."""


@dataclass(frozen=True)
class Member:
    """One leaderboard row: a plan, or one grid point of a sweep (repeated over the seeds)."""

    name: str                      # row label: "plan5" or "plan5 grpo.lr=1e-06"
    plan: str                      # base plan name or path
    overrides: tuple[str, ...]     # KEY=VALUE, without the campaign's shots/seed/baseline ones
    swept: tuple[tuple[str, Any], ...] = ()  # the grid point (empty for plain plans)
    sweep: Optional[int] = None    # index of the sweep in the file


@dataclass
class Campaign:
    config: CampaignConfig
    path: Path
    members: list[Member] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.name

    def seeds(self) -> list[Optional[int]]:
        """Seeds to repeat with; ``[None]`` = each plan's own seed, once."""
        return list(self.config.seeds) if self.config.seeds else [None]

    def overrides(self, member: Member, seed: Optional[int]) -> list[str]:
        """Everything ``lever run --set`` would get for this member at this seed."""
        out = [*self.config.set, *member.overrides]
        if self.config.shots is not None:
            out.append(f"infer.shots={json.dumps(self.config.shots)}")
        if seed is not None:
            out.append(f"seed={seed}")
        out.append(f"baseline_plan={self.config.baseline}")
        return out

    def resolve(self, member: Member, seed: Optional[int], profile: Optional[str]) -> tuple[PlanConfig, PlanConfig]:
        """The member's plan and its baseline (with the overrides a baseline shares)."""
        from lever.pipeline.runner import load_baseline

        ov = self.overrides(member, seed)
        plan = load_plan(member.plan, profile, ov)
        base = load_baseline(plan, profile, ov)
        if base is None:
            raise CampaignError(f"{self.path}: member {member.name!r} is the baseline plan itself")
        return plan, base

    def runs(self, profile: Optional[str]) -> list[tuple[Member, Optional[int], PlanConfig, PlanConfig]]:
        """Every (member, seed) with its resolved plan and baseline; plan errors name the member."""
        out = []
        for m in self.members:
            for s in self.seeds():
                try:
                    plan, base = self.resolve(m, s, profile)
                except PlanError as exc:
                    if isinstance(exc, CampaignError):
                        raise
                    raise CampaignError(f"{self.path}: member {m.name!r}"
                                        + (f" (seed {s})" if s is not None else "") + f": {exc}") from None
                out.append((m, s, plan, base))
        return out


def _line_map(node: yaml.Node, path: tuple = (), out: Optional[dict] = None) -> dict[tuple, int]:
    """Dotted location -> 1-based line of every key and list item in a composed YAML document."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = (*path, k.value)
            out[key] = k.start_mark.line + 1
            _line_map(v, key, out)
            out[key] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, (*path, i), out)
    return out


def _line_of(loc: tuple, lines: dict[tuple, int]) -> int:
    loc = tuple(loc)
    while loc and loc not in lines:
        loc = loc[:-1]
    return lines.get(loc, 1)


def _fmt(value: Any) -> str:
    """A grid value as ``--set`` text (JSON keeps lists and strings unambiguous)."""
    return value if isinstance(value, str) else json.dumps(value)


def load_campaign(path: str | Path) -> Campaign:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CampaignError(f"{path}: campaign file not found") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CampaignError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CampaignError(f"{path}:1: a campaign must be a mapping (name, baseline, plans/sweeps, ...)")
    lines = _line_map(node)
    try:
        cfg = CampaignConfig.model_validate(data)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            where = ".".join(str(x) for x in loc) or "<campaign>"
            msgs.append(f"{path}:{_line_of(loc, lines)}: field '{where}': {err['msg']}")
        raise CampaignError("invalid campaign:\n  " + "\n  ".join(msgs)) from None
    camp = Campaign(cfg, path)
    seen: dict[tuple, str] = {}

    def add(member: Member, loc: tuple) -> None:
        ident = (member.plan, tuple(sorted(member.overrides)))
        if ident in seen:
            raise CampaignError(f"{path}:{_line_of(loc, lines)}: member {member.name!r} repeats {seen[ident]!r}")
        seen[ident] = member.name
        camp.members.append(member)

    for i, plan in enumerate(cfg.plans):
        if plan == cfg.baseline:
            raise CampaignError(f"{path}:{_line_of(('plans', i), lines)}: field 'plans.{i}': {plan!r} is the "
                                "campaign's baseline; it is always in the leaderboard, list only the plans to compare")
        add(Member(plan, plan, ()), ("plans", i))
    for j, sw in enumerate(cfg.sweeps):
        fields = list(sw.grid)
        for point in itertools.product(*(sw.grid[f] for f in fields)):
            sets = tuple(f"{f}={_fmt(v)}" for f, v in zip(fields, point))
            label = " ".join(sets)
            add(Member(f"{sw.plan} {label}", sw.plan, (*sw.set, *sets), tuple(zip(fields, point)), j), ("sweeps", j))
    return camp


def load_and_resolve(path: str | Path, profile: Optional[str]) -> tuple[Campaign, list]:
    """The campaign and every resolved (member, seed, plan, baseline): what all commands start from."""
    camp = load_campaign(path)
    return camp, camp.runs(profile)
