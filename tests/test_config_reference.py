"""Every config field says what it does, and docs/config.md is the page the schema generates.

The walk that finds undescribed fields is shown failing on a dummy model (nested section, list of
entries) so that the check on the real schemas is known to be able to fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from lever.campaign.schema import CampaignConfig
from lever.cli.plans import config_reference
from lever.config.reference import type_name, undescribed_fields, walk_fields
from lever.config.schema import PlanConfig

ROOT = Path(__file__).resolve().parents[1]


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    told: int = Field(1, description="has one")
    silent: float = 0.5


class _Entry(BaseModel):
    blank: str = Field("x", description="   ")


class _Dummy(BaseModel):
    top: int = 3
    inner: _Inner = Field(_Inner(), description="a section")
    entries: list[_Entry] = Field([], description="a list of entries")


def test_walk_names_each_undescribed_field_with_its_path():
    assert undescribed_fields(_Dummy) == [
        "top (_Dummy.top)", "inner.silent (_Inner.silent)", "entries[].blank (_Entry.blank)",
    ]
    assert [p for p, _, _ in walk_fields(_Dummy)] == [
        "top", "inner", "inner.told", "inner.silent", "entries", "entries[].blank",
    ]


def test_every_plan_and_campaign_field_has_a_description():
    assert undescribed_fields(PlanConfig) == []
    assert undescribed_fields(CampaignConfig) == []
    # the walk reaches the deepest sections (not only the top level)
    paths = {p for p, _, _ in walk_fields(PlanConfig)}
    assert {"rl_data.sources.v2_sample.temperatures", "grpo.online.eval_samples", "data.synthetic.seed"} <= paths
    assert "sweeps[].grid" in {p for p, _, _ in walk_fields(CampaignConfig)}


def test_type_names():
    assert type_name(Literal["a", "b"]) == "a | b"
    assert type_name(Optional[int]) == "int or null"
    assert type_name(list[float]) == "list[float]"
    assert type_name(Optional[list[int]]) == "list[int] or null"


def test_reference_rows_show_type_default_bounds_and_description():
    text = config_reference()
    row = next(line for line in text.splitlines() if line.startswith("| `grpo.kl_beta` |"))
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert cells[1:4] == ["float", "`0.15`", ">= 0"]
    assert cells[4] == PlanConfig.model_fields["grpo"].annotation.model_fields["kl_beta"].description
    # Literal choices keep their '|' escaped inside the table, and key-free fields are marked
    assert "| `grpo.rollout` | offline \\| online | `\"offline\"` |" in text
    assert "`lvlm.image_cache_mb`" in text and "*(not part of any artifact key)*" in text
    # every described leaf field of the plan appears as a row
    for path, field, _ in walk_fields(PlanConfig):
        if not hasattr(field.annotation, "model_fields"):
            assert f"| `{path}` |" in text, path


def test_committed_page_equals_the_generated_one():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == config_reference(), (
        "docs/config.md is stale: regenerate it with `python -m lever plan fields --out docs/config.md`")


def test_cli_writes_the_page(tmp_path, capsys):
    from lever.cli import main

    out = tmp_path / "config.md"
    main(["plan", "fields", "--out", str(out)])
    assert out.read_text() == config_reference()
    main(["plan", "fields"])
    assert capsys.readouterr().out == config_reference()
