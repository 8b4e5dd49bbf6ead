"""Shared, memoized tiny-profile objects for the LVLM / beams / RL-data tests.

Why a plain module and not conftest fixtures: several test modules need the same tiny LVLM and
synthetic dataset; memoizing here builds each once per session whatever the collection order.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from lever.context import StageContext, UpstreamOutput
from lever.context import Unit


def tiny_plan(*overrides: str):
    from lever.config.loader import load_plan

    return load_plan("baseline", profile="tiny", overrides=list(overrides))


@functools.lru_cache(maxsize=None)
def tiny_lvlm():
    """The tiny profile's LVLM (warm-up weights, cached on disk after the first build)."""
    from lever.models.factory import build_lvlm

    return build_lvlm(tiny_plan().lvlm)


@functools.lru_cache(maxsize=None)
def tiny_data() -> Path:
    """prepare-data + export-embeddings of the tiny profile, run once into a temp store."""
    from lever.stages.prepare_data import prepare_data
    from lever.stages.embeddings import export_embeddings

    root = Path(tempfile.mkdtemp(prefix="lever-tiny-data-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    plan = tiny_plan()
    (root / "prepare-data").mkdir()
    (root / "export-embeddings").mkdir()
    prepare_data(StageContext(plan, "prepare-data", Unit("prepare-data"), {}, root / "prepare-data"))
    export_embeddings(StageContext(plan, "export-embeddings", Unit("export-embeddings"),
                                   {"prepare-data": upstream("prepare-data", root / "prepare-data")},
                                   root / "export-embeddings"))
    return root


def upstream(stage: str, *dirs: Path, units: Optional[list[Unit]] = None) -> UpstreamOutput:
    units = units or [Unit(stage)] * len(dirs)
    return UpstreamOutput(stage, list(zip(units, dirs)))


def base_inputs() -> dict[str, UpstreamOutput]:
    root = tiny_data()
    return {"prepare-data": upstream("prepare-data", root / "prepare-data"),
            "export-embeddings": upstream("export-embeddings", root / "export-embeddings")}


def stage_ctx(plan: Any, stage: str, out: Path, inputs: dict, shard: int = 0, of: int = 1) -> StageContext:
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(plan, stage, Unit(stage, (("shard", shard), ("of", of))), inputs, out)
