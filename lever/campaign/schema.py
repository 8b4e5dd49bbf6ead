"""The campaign file: which plans and sweeps to run, against which baseline, at which shots and seeds.

A campaign is closed like a plan (``extra="forbid"``): a misspelt key is an error naming the file
and line (``lever.campaign.loader``), never a silently ignored setting that wastes a GPU night.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sweep(_Closed):
    """One base plan run at every point of a grid of ``--set`` fields (the cartesian product)."""

    plan: str = Field(..., description="base plan (shipped name or YAML path) every grid point starts from")
    grid: dict[str, list[Any]] = Field(
        ..., description="dotted plan field -> values to try, e.g. {'grpo.lr': [1e-6, 5e-6]}; "
        "members are the cartesian product of all lists")
    set: list[str] = Field(default_factory=list, description="fixed KEY=VALUE overrides for every point of this sweep")

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not grid:
            raise ValueError("a sweep needs at least one field in its grid")
        for field, values in grid.items():
            if not values:
                raise ValueError(f"grid field {field!r} has no values")
            if len({repr(v) for v in values}) != len(values):
                raise ValueError(f"grid field {field!r} repeats a value: {values}")
            if field.split(".")[0] in ("name", "extends", "profile", "baseline_plan"):
                raise ValueError(f"grid field {field!r} cannot be swept (it names plans, not settings)")
        return grid


class LeaderboardConfig(_Closed):
    """How the leaderboard decides what is a real improvement."""

    alpha: float = Field(0.05, gt=0.0, lt=0.5, description="family-wise error rate of the Holm-adjusted tests")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="level of the per-shot (unadjusted) bootstrap intervals")
    bootstrap_samples: int = Field(2000, ge=200, description="paired bootstrap resamples per interval")
    permutations: int = Field(20000, ge=1000, description="random sign flips per paired permutation test")
    margin: float = Field(0.0, ge=0.0, description="accuracy points: with --fail-on-regression, a member "
                          "significantly below the baseline by more than this fails the run")
    seed: int = Field(0, description="seed of the bootstrap and permutation draws (reports are reproducible)")


class CampaignConfig(_Closed):
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_-]{0,40}$",
                      description="campaign name (lowercase, digits, - and _): names the Workflow and the report")
    description: str = Field("", description="one line for humans")
    baseline: str = Field("baseline", description="plan every member is compared with (its baseline_plan)")
    plans: list[str] = Field(default_factory=list, description="plans run as they are (shipped names or YAML paths)")
    sweeps: list[Sweep] = Field(default_factory=list, description="grids of overrides over one base plan each")
    shots: Optional[list[int]] = Field(None, description="infer.shots for every member and the baseline "
                                       "(default: each plan's own)")
    seeds: Optional[list[int]] = Field(None, description="repeat every member (and the baseline) with seed=S "
                                       "for each S; the leaderboard then reports seed-to-seed spread")
    set: list[str] = Field(default_factory=list, description="KEY=VALUE overrides for every member "
                           "(and for the baseline where a baseline shares them, as with `lever run --set`)")
    leaderboard: LeaderboardConfig = Field(default_factory=LeaderboardConfig,
                                           description="statistics of the leaderboard")

    @field_validator("shots")
    @classmethod
    def _shots(cls, shots: Optional[list[int]]) -> Optional[list[int]]:
        if shots is not None and (not shots or any(s < 1 for s in shots) or len(set(shots)) != len(shots)):
            raise ValueError(f"shots must be distinct integers >= 1, got {shots}")
        return shots

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: Optional[list[int]]) -> Optional[list[int]]:
        if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _members(self) -> "CampaignConfig":
        if not self.plans and not self.sweeps:
            raise ValueError("a campaign needs at least one entry in 'plans' or 'sweeps'")
        return self
