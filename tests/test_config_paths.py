"""A stage's declared config fields are checked against the plan schema when the stage is defined."""

from __future__ import annotations

import pytest

from lever.config.paths import check_config_path
from lever.pipeline.graph import STAGES, Stage


def test_schema_paths_resolve_and_typos_are_named():
    for ok in ("lvlm", "infer.split", "grpo.online.group_size", "alerts.kl_max", "seed"):
        check_config_path(ok)
    with pytest.raises(ValueError, match=r"'infer.splt'.*infer has no field 'splt'.*split"):
        check_config_path("infer.splt")
    with pytest.raises(ValueError, match=r"the plan has no field 'lvml'"):
        check_config_path("lvml")
    with pytest.raises(ValueError, match=r"'seed' is a value, not a section"):
        check_config_path("seed.x")


def test_a_stage_declaring_a_missing_field_fails_at_definition():
    with pytest.raises(ValueError, match=r"stage 'x': config path 'beam.widht'"):
        Stage("x", "m:f", (), ("beam.widht",))


def test_every_shipped_stage_and_plan_extra_field_is_a_schema_path():
    from lever.config import list_plans, load_plan

    for st in STAGES:
        for name in list_plans():
            for f in st.fields_for(load_plan(name, "tiny", [])):
                check_config_path(f)
