"""The configuration reference page (``docs/config.md``), generated from the schemas.

The descriptions live on the pydantic fields, next to the code that validates them, so the page is
rendered from them instead of being kept by hand: a committed copy that drifts from the schema
fails ``tests/test_config_reference.py``.  ``undescribed_fields`` is the same walk used as a check:
a new field without a ``description=`` is named there, and the test fails.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Iterator, Literal, Union

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

#: command that regenerates the page (named in its header)
REGENERATE = "python -m lever plan fields --out docs/config.md"

_BOUNDS = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "<="),
           (annotated_types.Lt, "lt", "<"))


def _model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field nests (a config section), or None for a leaf value."""
    return _model(annotation)


def _item_model(annotation: Any) -> type[BaseModel] | None:
    """The model of each entry of a list field (a campaign's ``sweeps``), or None."""
    if typing.get_origin(annotation) is list:
        (arg,) = typing.get_args(annotation)
        return _model(arg)
    return None


def _nested(name: str, field: FieldInfo) -> tuple[str, type[BaseModel]] | None:
    """``(path segment, model)`` of a section or of a list's entries; None for a leaf value."""
    sub = _section_model(field.annotation)
    if sub is not None:
        return name, sub
    item = _item_model(field.annotation)
    return (f"{name}[]", item) if item is not None else None


def walk_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo, type[BaseModel]]]:
    """Every field of ``model`` and of the sections it nests, depth first, as
    ``(dotted path, field, owning model)``; a section's own field comes before its children."""
    for name, field in model.model_fields.items():
        path = prefix + name
        yield path, field, model
        nested = _nested(name, field)
        if nested is not None:
            yield from walk_fields(nested[1], prefix + nested[0] + ".")


def undescribed_fields(model: type[BaseModel]) -> list[str]:
    """Dotted paths (with the owning class) of fields that carry no ``description=``."""
    return [f"{path} ({owner.__name__}.{path.rsplit('.', 1)[-1]})"
            for path, field, owner in walk_fields(model) if not (field.description or "").strip()]


def type_name(annotation: Any) -> str:
    """A short human name of a field type: ``Literal`` values joined by ``|``, ``or null`` for Optional."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        name = " or ".join(type_name(a) for a in rest)
        return f"{name} or null" if len(rest) < len(args) else name
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    return json.dumps(value)


def _bounds(field: FieldInfo) -> str:
    out = []
    for meta in field.metadata:
        for kind, attr, sign in _BOUNDS:
            if isinstance(meta, kind):
                out.append(f"{sign} {getattr(meta, attr)}")
    return ", ".join(out)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _not_in_key(field: FieldInfo) -> bool:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return extra.get("in_key") is False


def field_table(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| field | type | default | allowed | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if _section_model(field.annotation) is not None:
            continue
        desc = (field.description or "").strip()
        if _not_in_key(field):
            desc += " *(not part of any artifact key)*"
        rows.append(f"| `{prefix}{name}` | {_cell(type_name(field.annotation))} | `{_cell(_default(field))}` | "
                     f"{_cell(_bounds(field))} | {_cell(desc)} |")
    return rows


def section_blocks(model: type[BaseModel], prefix: str, level: int) -> list[str]:
    """A heading and table per nested section, in schema order."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        nested = _nested(name, field)
        if nested is None:
            continue
        path, sub = prefix + nested[0], nested[1]
        out += ["", f"{'#' * level} `{path}`", "", (field.description or "").strip()]
        doc = (sub.__doc__ or "").strip()
        if doc and doc != (field.description or "").strip():
            out += ["", " ".join(doc.split())]
        if any(_section_model(f.annotation) is None for f in sub.model_fields.values()):
            out += [""] + field_table(sub, path + ".")
        out += section_blocks(sub, path + ".", min(level + 1, 4))
    return out
