"""Selector checkpoints: safetensors weights + a JSON meta file, never a pickle.

A checkpoint is two files sharing a stem: ``NAME.safetensors`` and ``NAME.json``.  The JSON says
how to rebuild the module (``arch`` = SelectorConfig fields + ``embed_dim``) and which key
``layout`` the tensors use:

* ``"v3"`` -- the parameter names of :class:`~lever.selectors.pointer.PointerSelector` as is.
* ``"v2"`` -- the layout the reference project's v2 inference loader reads: every key prefixed
  with ``pointer_selector.`` and the modules renamed per :data:`V2_RENAMES` (``query_proj`` ->
  ``query_encoder.proj``, ``layers.i.attn`` -> ``cross_attn.i``, ``layers.i.norm`` ->
  ``cross_attn_norm.i``, ``update`` -> ``state_update.proj``, ``update_norm`` ->
  ``state_update.norm``, ``score_q`` / ``score_c`` -> ``pointer_head.query`` / ``pointer_head.key``).
  The mapping is a bijection, so :func:`to_v2_state` / :func:`from_v2_state` round-trip exactly.

:func:`load_checkpoint` accepts both layouts and refuses a file whose tensor names or shapes do
not match what its meta describes, naming the first offending key.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from lever.config.schema import SelectorConfig
from lever.errors import StageError
from lever.versioning import upgrade
from lever.selectors.pointer import PointerSelector
from lever.io import atomic_write_bytes
from lever.io import atomic_write_json as _atomic_write_json

SCHEMA_VERSION = 1
V2_PREFIX = "pointer_selector."
#: (v3 prefix, v2 prefix) pairs; ``{i}`` is a layer index.  First match wins in either direction.
V2_RENAMES: tuple[tuple[str, str], ...] = (
    ("query_proj.", "query_encoder.proj."),
    ("cand_proj.", "candidate_encoder.proj."),
    ("layers.{i}.attn.", "cross_attn.{i}."),
    ("layers.{i}.norm.", "cross_attn_norm.{i}."),
    ("update_norm.", "state_update.norm."),
    ("update.", "state_update.proj."),
    ("score_q.", "pointer_head.query."),
    ("score_c.", "pointer_head.key."),
)


# -- atomic file helpers (shared by the training stages) -----------------------------------------

def json_safe(row: dict) -> dict:
    """JSON has no NaN/inf: such values become null and their keys are listed under ``nonfinite``."""
    bad = sorted(k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v))
    if not bad:
        return row
    return {**{k: (None if k in bad else v) for k, v in row.items()}, "nonfinite": bad}


def atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_json(Path(path), obj, indent=2, sort_keys=True)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    blob = save_bytes({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(Path(path), blob)


# -- layouts ------------------------------------------------------------------------------------

def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for src, dst in pairs:
        m = _pattern(src).match(key)
        if m:
            return dst.replace("{i}", m.group(1) if m.groups() else "") + key[m.end():]
    raise KeyError(key)


def to_v2_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """v3 parameter names -> the v2 inference layout (see module docstring)."""
    pairs = list(V2_RENAMES)
    return {V2_PREFIX + _rename(k, pairs): v for k, v in state.items()}


def from_v2_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_v2_state`."""
    pairs = [(v2, v3) for v3, v2 in V2_RENAMES]
    out = {}
    for k, v in state.items():
        if not k.startswith(V2_PREFIX):
            raise KeyError(k)
        out[_rename(k[len(V2_PREFIX):], pairs)] = v
    return out


# -- save / load --------------------------------------------------------------------------------

def arch_of(model: PointerSelector) -> dict[str, Any]:
    return {**model.cfg.model_dump(), "embed_dim": model.embed_dim}


def _stem(path: Path | str) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def save_checkpoint(
    path: Path | str,
    model: PointerSelector,
    *,
    plan: str = "",
    config_hash: str = "",
    epoch: int = 0,
    phase: str = "",
    metrics: Optional[dict[str, Any]] = None,
    layout: str = "v3",
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    """Write ``path.safetensors`` then ``path.json`` (meta last, so a complete meta implies weights)."""
    if layout not in ("v3", "v2"):
        raise ValueError(f"layout must be 'v3' or 'v2', got {layout!r}")
    stem = _stem(path)
    state = {k: v for k, v in model.state_dict().items()}
    if layout == "v2":
        state = to_v2_state(state)
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "pointer",
        "layout": layout,
        "arch": arch_of(model),
        "plan": plan,
        "config_hash": config_hash,
        "epoch": int(epoch),
        "phase": phase,
        "metrics": json_safe(dict(metrics or {})),
    }
    if extra:
        meta.update(extra)
    atomic_save_tensors(stem.with_suffix(".safetensors"), state, metadata={"layout": layout})
    atomic_write_json(stem.with_suffix(".json"), meta)
    return stem


#: pickle-based formats: loading one can run arbitrary code, so Lever refuses them by name
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def _refuse_pickle(path: Path | str) -> None:
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise StageError(f"{path}: refused: {Path(path).suffix} is a pickle-based format, which can run code "
                         "when loaded; Lever reads checkpoints only as .safetensors + .json")


def read_meta(path: Path | str) -> dict[str, Any]:
    _refuse_pickle(path)
    stem = _stem(path)
    jpath = stem.with_suffix(".json")
    try:
        meta = json.loads(jpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{jpath}: checkpoint meta not found") from None
    except json.JSONDecodeError as e:
        raise StageError(f"{jpath}: line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(meta, dict):
        raise StageError(f"{jpath}: expected a JSON object")
    # refuses a newer schema_version; migrates an unversioned (version 0) meta
    meta = upgrade(meta, "checkpoint", str(jpath))
    for field in ("kind", "arch"):
        if field not in meta:
            raise StageError(f"{jpath}: field {field!r} missing")
    if meta["kind"] != "pointer":
        raise StageError(f"{jpath}: field 'kind' is {meta['kind']!r}; only 'pointer' checkpoints load here")
    return meta


def load_checkpoint(path: Path | str, *, map_location: str = "cpu") -> tuple[PointerSelector, dict[str, Any]]:
    """Rebuild the selector from ``path(.json|.safetensors)``; never unpickles.

    Raises StageError when the meta is malformed or the tensors do not match the architecture
    the meta describes (missing/unexpected key, wrong shape), naming the file and key.
    """
    _refuse_pickle(path)
    stem = _stem(path)
    meta = read_meta(stem)
    jpath, wpath = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    arch = dict(meta["arch"])
    try:
        embed_dim = int(arch.pop("embed_dim"))
        cfg = SelectorConfig(**arch)
    except (KeyError, TypeError, ValueError) as e:
        raise StageError(f"{jpath}: field 'arch' invalid: {e}") from None
    model = PointerSelector(embed_dim, cfg)
    try:
        state = load_file(str(wpath), device=map_location)
    except FileNotFoundError:
        raise StageError(f"{wpath}: checkpoint weights not found") from None
    except (SafetensorError, OSError) as e:
        raise StageError(f"{wpath}: not a readable safetensors file ({e})") from None
    layout = meta.get("layout", "v3")
    if layout == "v2":
        try:
            state = from_v2_state(state)
        except KeyError as e:
            raise StageError(f"{wpath}: key {e.args[0]!r} is not in the v2 layout") from None
    elif layout != "v3":
        raise StageError(f"{jpath}: field 'layout' is {layout!r}; expected 'v3' or 'v2'")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise StageError(
            f"{wpath}: tensors do not match the architecture in {jpath.name}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise StageError(
                f"{wpath}: tensor {k!r} has shape {tuple(state[k].shape)} but {jpath.name} "
                f"(embed_dim={embed_dim}, hidden={cfg.hidden}) implies {tuple(v.shape)}"
            )
    model.load_state_dict(state)
    model.eval()
    return model, meta
