"""Dispatch ``lever validate KIND FILE`` to the reader the consuming stage uses; collect problems.

A problem is one line naming file, line (where the format has lines) and field.  Readers that
already collect every problem (RL data, predictions) are asked for the list; readers that stop at
their first error (checkpoints) contribute that one, which is all a stage would see too.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from lever.errors import StageError

KINDS = ("rl-data", "plan", "predictions", "checkpoint")
#: suffixes of pickle-based formats; Lever never opens them (arbitrary code runs on unpickling)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


@dataclass
class Problem:
    text: str

    def __str__(self) -> str:
        return self.text


def split_message(msg: str) -> list[str]:
    """A multi-problem StageError message (first line + indented lines) -> one string per problem."""
    out = []
    for line in str(msg).splitlines():
        line = line.strip()
        if not line or re.fullmatch(r"\(\d+ problems\)|\.\.\. and \d+ more", line) or line == "invalid plan:":
            continue
        out.append(line)
    return out or [str(msg)]


# -- rl-data ----------------------------------------------------------------------------------

def validate_rl_data(path: Path, plan: Optional[object] = None) -> list[str]:
    from lever.rl import data as rl

    checker = getattr(rl, "check_rl_data", None)
    if checker is not None:
        _, problems = checker([path])
        return list(problems)
    try:
        rl.read_rl_data([path])
    except StageError as exc:
        return split_message(str(exc))
    return []


# -- predictions ------------------------------------------------------------------------------

def validate_predictions(path: Path, plan: Optional[object] = None) -> list[str]:
    from lever.validation.predictions import check_predictions

    p = path / "predictions.jsonl" if path.is_dir() else path
    return check_predictions(p)[1]


# -- checkpoint -------------------------------------------------------------------------------

def validate_checkpoint(path: Path, plan: Optional[object] = None) -> list[str]:
    if path.is_dir():  # an artifact directory: every .json + .safetensors pair in it
        stems = sorted({p.with_suffix("") for p in path.glob("*.json") if p.with_suffix(".safetensors").exists()})
        if not stems:
            return [f"{path}: no checkpoint (NAME.json + NAME.safetensors) in this directory"]
        return [p for stem in stems for p in validate_checkpoint(stem, plan)]
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return [f"{path}: refused: {path.suffix} is a pickle-based format, which can run code when loaded; "
                "Lever reads checkpoints only as .safetensors + .json"]
    from lever.selectors.checkpoint import load_checkpoint

    try:
        _, meta = load_checkpoint(path)
    except StageError as exc:
        return split_message(str(exc))
    problems = []
    if plan is not None:  # the stage would build the selector from the plan and load these weights into it
        sel = getattr(plan, "selector")
        arch = meta.get("arch", {})
        for field in ("hidden", "layers", "heads"):
            if field in arch and arch[field] != getattr(sel, field):
                problems.append(f"{path}: field 'arch.{field}': {arch[field]} but the plan's selector.{field} "
                                f"is {getattr(sel, field)}")
    return problems


# -- plan -------------------------------------------------------------------------------------

_PLAN_LINE = re.compile(r"^(?P<src>\S.*?): field '(?P<loc>[^']*)': (?P<msg>.*)$")


def yaml_key_lines(path: Path) -> dict[str, int]:
    """Dotted key -> 1-based line of that key in a YAML mapping file ({} if unreadable)."""
    import yaml

    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    out: dict[str, int] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                out[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(root, "")
    return out


def _known_fields(loc: str) -> list[str]:
    """Field names allowed where ``loc`` sits (for "did you mean")."""
    from pydantic import BaseModel

    from lever.config.schema import PlanConfig

    model: type[BaseModel] = PlanConfig
    for part in loc.split(".")[:-1]:
        f = model.model_fields.get(part)
        ann = getattr(f, "annotation", None) if f is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _plan_problem(line: str, plan_path: Path) -> str:
    m = _PLAN_LINE.match(line)
    if not m:
        return line if line.startswith(str(plan_path)) else f"{plan_path}: {line}"
    src, loc, msg = Path(m["src"]), m["loc"], m["msg"].removeprefix("Value error, ")
    if loc == "<plan>":  # a cross-field check: point at the first field it names, in the plan file
        named = re.findall(r"([a-z_0-9]+(?:\.[a-z_0-9]+)+)=", msg)
        lines = yaml_key_lines(plan_path)
        for name in named:
            if name in lines:
                return f"{plan_path}: line {lines[name]}: field '{name}': {msg}"
        return f"{plan_path}: field '{named[0] if named else loc}': {msg}"
    lines = yaml_key_lines(src)
    key = loc
    while key and key not in lines:
        key = key.rpartition(".")[0]
    where = f"{src}: line {lines[key]}" if key else str(src)
    hint = ""
    if "Extra inputs" in msg:
        close = difflib.get_close_matches(loc.rsplit(".", 1)[-1], _known_fields(loc), n=1)
        if close:
            hint = f" (did you mean '{close[0]}'?)"
    return f"{where}: field '{loc}': {msg}{hint}"


def validate_plan(path: Path, plan: Optional[object] = None, profile: Optional[str] = None) -> list[str]:
    from lever.config.loader import PlanError, load_plan

    if not path.exists():
        return [f"{path}: file not found"]
    try:
        load_plan(str(path), profile)
    except PlanError as exc:
        msg = str(exc)
        if "invalid YAML" in msg:  # one problem, at the line the parser stopped
            first = msg.splitlines()[0]
            where = re.search(r"line (\d+), column (\d+)", msg)
            at = f"line {where[1]}, column {where[2]}: " if where else ""
            detail = " ".join(line.strip() for line in msg.splitlines()[1:] if line.strip() and "^" not in line)
            return [f"{path}: {at}{first.split(': ', 1)[-1]} {detail}".strip()]
        return [_plan_problem(line, path) for line in split_message(msg)]
    return []


VALIDATORS: dict[str, Callable[..., list[str]]] = {
    "rl-data": validate_rl_data,
    "plan": validate_plan,
    "predictions": validate_predictions,
    "checkpoint": validate_checkpoint,
}


def validate(kind: str, path: Path | str, plan: Optional[object] = None, *, profile: Optional[str] = None) -> list[Problem]:
    """Every problem ``kind``'s consuming stage would have with ``path`` ([] = valid)."""
    if kind not in VALIDATORS:
        raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    path = Path(path)
    if kind != "checkpoint" and not path.exists():
        return [Problem(f"{path}: file not found")]
    if kind == "plan":
        return [Problem(p) for p in validate_plan(path, plan, profile)]
    return [Problem(p) for p in VALIDATORS[kind](path, plan)]
