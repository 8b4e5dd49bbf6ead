"""Dotted paths into the plan schema (``"infer.split"``, ``"lvlm"``), checked against it.

Why: a stage's key is made of the config fields it declares (``Stage.config_fields``).  A path
the schema does not have (a typo, a field renamed since) would only fail when a key is first
computed, as a bare KeyError deep in the hashing; checking each declared path when the stage is
defined turns it into an error at import that names the path and the fields that do exist.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel

from lever.config.schema import PlanConfig


def _section(annotation: Any) -> Optional[type[BaseModel]]:
    """The model a field holds when it is a section (a nested model), else None."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def check_config_path(path: str, model: type[BaseModel] = PlanConfig) -> None:
    """Raise ValueError unless ``path`` names a field (or a whole section) of ``model``."""
    current: Optional[type[BaseModel]] = model
    walked: list[str] = []
    for part in path.split("."):
        if current is None:
            raise ValueError(f"config path {path!r}: {'.'.join(walked)!r} is a value, not a section")
        fields = current.model_fields
        if part not in fields:
            where = ".".join(walked) or "the plan"
            raise ValueError(f"config path {path!r}: {where} has no field {part!r} "
                             f"(fields: {', '.join(sorted(fields))})")
        walked.append(part)
        current = _section(fields[part].annotation)
