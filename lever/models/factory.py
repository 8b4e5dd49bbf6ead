"""Builds the configured LVLM: the tiny offline model or a provisioned Qwen2.5-VL.

The builder lives apart from the interface (``lever.models.lvlm``) because it reaches into every
model source (the tiny model and its warm-up, the provisioner, the pretrained loader) while those
sources need the interface; keeping both in one module made an import circle.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

import torch

from lever.models.lvlm import QwenVLM

if TYPE_CHECKING:  # pragma: no cover
    from lever.config.schema import LVLMConfig

__all__ = ["build_lvlm", "plan_lvlm", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


_CACHE: dict[str, QwenVLM] = {}


def build_lvlm(cfg: "LVLMConfig", cache: bool = True, models_root: Optional[str] = None) -> QwenVLM:
    """The configured LVLM; one instance per config per process (stages of a local run share it).

    ``qwen2_5_vl`` loads from a provisioned directory (``lever.models.provision.resolve``: a
    local directory, an s3:// snapshot, or a hub id at its pinned revision under ``models_root``
    or in the Hugging Face cache); a model that is not there is a StageError (exit 2)."""
    key = cfg.model_dump_json() + f"|{models_root}"
    if cache and key in _CACHE:
        return _CACHE[key]
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.kind == "tiny_qwen2_5_vl":
        from lever.models.tiny_qwen import build_tiny_qwen

        model, processor = build_tiny_qwen(cfg)
        model = model.to(device=device, dtype=dtype)
    elif cfg.kind == "qwen2_5_vl":
        from lever.models.pretrained import load_qwen
        from lever.models.provision import ModelRef, resolve

        directory = resolve(ModelRef("lvlm", cfg.name, cfg.revision), models_root)
        log.info("lvlm: loading %s from %s (%s, %s)", cfg.name, directory, dtype, device)
        model, processor = load_qwen(directory, dtype, device, cfg.min_pixels, cfg.max_pixels)
    else:  # pragma: no cover - the schema's Literal forbids it
        raise ValueError(f"unknown lvlm.kind {cfg.kind!r}")
    model.eval()
    lvlm = QwenVLM(model, processor, cfg, device, dtype)
    from lever.models.decoding import neutralize

    neutralize(model, lvlm.pad_id, lvlm.tokenizer.eos_token_id, cfg.max_new_tokens)
    if cache:
        _CACHE[key] = lvlm
    return lvlm


def plan_lvlm(plan: Any) -> QwenVLM:
    """``build_lvlm`` for a plan: its ``lvlm`` section, with its ``models.root`` when one is set
    (the call stays ``build_lvlm(cfg)`` otherwise, so a stand-in LVLM can replace it in tests)."""
    root = plan.models.root
    return build_lvlm(plan.lvlm) if root is None else build_lvlm(plan.lvlm, models_root=root)
