"""Plan loading: YAML presets with ``extends`` inheritance, then a profile overlay.

Resolution order (later wins): ``defaults.yaml`` <- parent plans <- the plan <- the profile
<- explicit ``--set`` overrides.  Each leaf key remembers the file that last set it, so a
validation error can name both the field and the file to fix.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pydantic import ValidationError

from lever.config.schema import PlanConfig

PROFILES = ("tiny", "cluster")


class PlanError(Exception):
    """A plan that cannot be resolved; the CLI maps it to exit code 2."""


@dataclass
class _Layer:
    data: dict
    source: str


@dataclass
class ResolvedPlan:
    config: PlanConfig
    sources: dict[str, str] = field(default_factory=dict)


def presets_dir() -> Path:
    return Path(__file__).resolve().parent / "presets"


def list_plans() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml") if p.stem != "defaults")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise PlanError(f"{path}: file not found") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PlanError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _plan_path(name_or_path: str, relative_to: Optional[Path] = None) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_absolute() and relative_to is not None and (relative_to / p).exists():
            return relative_to / p
        return p
    candidate = presets_dir() / f"{name_or_path}.yaml"
    if relative_to is not None and (relative_to / f"{name_or_path}.yaml").exists():
        return relative_to / f"{name_or_path}.yaml"
    return candidate


def _chain(name_or_path: str) -> list[_Layer]:
    """Layers from the root (defaults) to the named plan."""
    layers: list[_Layer] = []
    seen: set[Path] = set()
    path = _plan_path(name_or_path)
    if not path.exists():
        known = ", ".join(list_plans())
        raise PlanError(f"unknown plan {name_or_path!r} ({path} not found); known plans: {known}")
    while True:
        path = path.resolve()
        if path in seen:
            raise PlanError(f"{path}: 'extends' forms a cycle")
        seen.add(path)
        data = _read_yaml(path)
        layers.append(_Layer(data, str(path)))
        parent = data.get("extends")
        if parent is None:
            if path.stem != "defaults":
                parent = "defaults"
            else:
                break
        parent_path = _plan_path(str(parent), relative_to=path.parent)
        if not parent_path.exists():
            raise PlanError(f"{path}: field 'extends': parent plan {parent!r} not found ({parent_path})")
        path = parent_path
    return list(reversed(layers))


def _merge(base: dict, over: dict, src: str, sources: dict[str, str], prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, src, sources, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
            sources[dotted] = src
            if isinstance(value, dict):
                for sub in _leaves(value, dotted + "."):
                    sources[sub] = src
    return out


def _leaves(d: dict, prefix: str) -> Iterable[str]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _set_override(spec: str) -> dict:
    """``grpo.kl_beta=0.1`` -> nested dict with the YAML-parsed value."""
    if "=" not in spec:
        raise PlanError(f"override {spec!r}: expected KEY=VALUE")
    key, raw = spec.split("=", 1)
    value = yaml.safe_load(raw)
    out: dict = {}
    cur = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return out


def parse_overrides(text: str) -> list[str]:
    """The ``overrides`` workflow parameter: a JSON list of ``KEY=VALUE`` strings (empty = none).

    JSON because one Argo parameter becomes one container argument, and values may themselves
    hold spaces, commas or brackets (``infer.shots=[1, 2]``)."""
    import json

    text = (text or "").strip()
    if not text:
        return []
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise PlanError(f"--overrides: not a JSON list of KEY=VALUE strings: {exc}") from None
    if not isinstance(items, list) or not all(isinstance(i, str) and "=" in i for i in items):
        raise PlanError(f"--overrides: expected a JSON list of KEY=VALUE strings, got {text[:200]!r}")
    return items


def overrides_json(overrides: Iterable[str]) -> str:
    """Inverse of :func:`parse_overrides` (compact, stable)."""
    import json

    return json.dumps(list(overrides), separators=(",", ":"))


def _source_for(loc: tuple, sources: dict[str, str]) -> str:
    dotted = ".".join(str(x) for x in loc)
    while dotted:
        if dotted in sources:
            return sources[dotted]
        dotted = dotted.rpartition(".")[0]
    return "defaults"


def resolve_plan(
    name_or_path: str,
    profile: Optional[str] = None,
    overrides: Optional[list[str]] = None,
) -> ResolvedPlan:
    layers = _chain(name_or_path)
    if profile is not None:
        ppath = presets_dir() / "profiles" / f"{profile}.yaml"
        if not ppath.exists():
            raise PlanError(f"unknown profile {profile!r}; known profiles: {', '.join(PROFILES)}")
        layers.append(_Layer(_read_yaml(ppath), str(ppath)))
    for spec in overrides or []:
        layers.append(_Layer(_set_override(spec), f"--set {spec}"))

    merged: dict = {}
    sources: dict[str, str] = {}
    for layer in layers:
        merged = _merge(merged, layer.data, layer.source, sources)
    # the plan's own name wins over inherited names; extends is kept for provenance only
    plan_layer = layers[len(layers) - 1 - (1 if profile else 0) - len(overrides or [])]
    merged["name"] = plan_layer.data.get("name", Path(plan_layer.source).stem)
    merged["extends"] = plan_layer.data.get("extends")
    merged["profile"] = profile
    try:
        cfg = PlanConfig.model_validate(merged)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "<plan>"
            # a cross-field check (empty loc) is the plan's fault, not the defaults'
            src = _source_for(err["loc"], sources) if err["loc"] else plan_layer.source
            lines.append(f"{src}: field '{loc}': {err['msg']}")
        raise PlanError("invalid plan:\n  " + "\n  ".join(lines)) from None
    return ResolvedPlan(cfg, sources)


def load_plan(name_or_path: str, profile: Optional[str] = None, overrides: Optional[list[str]] = None) -> PlanConfig:
    return resolve_plan(name_or_path, profile, overrides).config


def plan_to_yaml(cfg: PlanConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _not_in_keys(model: type, prefix: str = "") -> list[str]:
    """Dotted paths of fields marked ``json_schema_extra={"in_key": False}``: settings that change
    how a stage runs (memory bounds), never what it writes, so artifacts stay shared across them."""
    out: list[str] = []
    for name, f in model.model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if extra.get("in_key") is False:
            out.append(prefix + name)
        ann = f.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            out += _not_in_keys(ann, f"{prefix}{name}.")
    return out


NOT_IN_KEYS: tuple[str, ...] = tuple(_not_in_keys(PlanConfig))


def _drop(dumped: dict, path: str) -> None:
    *parents, leaf = path.split(".")
    cur: Any = dumped
    for part in parents:
        cur = cur.get(part) if isinstance(cur, dict) else None
    if isinstance(cur, dict):
        cur.pop(leaf, None)


def config_hash(cfg: PlanConfig, fields: Iterable[str], extra: Any = None) -> str:
    """Stable hash of the named config sections (dotted paths), plus anything extra (input hashes).
    Fields in ``NOT_IN_KEYS`` are left out."""
    dumped = cfg.model_dump(mode="json")
    for path in NOT_IN_KEYS:
        _drop(dumped, path)
    picked = {}
    for f in sorted(fields):
        cur: Any = dumped
        for part in f.split("."):
            cur = cur[part]
        picked[f] = cur
    blob = json.dumps({"fields": picked, "extra": extra}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
