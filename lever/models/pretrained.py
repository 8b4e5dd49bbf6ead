"""Pretrained Qwen2.5-VL and CLIP from a local directory in the hub layout (the cluster route).

Why a module of its own: the tiny path builds its model and processor in code, so it never ran
``from_pretrained``, the hub's ``Qwen2Tokenizer``, the published chat template or a checkpoint's
``generation_config.json`` -- and the cluster path failed on a new user's first day.  Everything
here reads only the directory :func:`lever.models.provision.resolve` returned (no network).

The processor is transformers' ``Qwen2_5_VLProcessor`` built without its video processor:
``AutoProcessor`` would construct Qwen's video processor, which needs torchvision, and torchvision
wheels must match the torch build exactly (the CPU torch of CI has none that imports).  Lever
sends no video, so the processor is the real class with the video slot left empty, on every
machine, and the image processor is the PIL backend everywhere, so CPU CI and the GPU image turn
an image into the same pixels.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from lever.errors import StageError

log = logging.getLogger(__name__)


def processor_class():
    """``Qwen2_5_VLProcessor`` whose constructor does not require a video processor.

    The processor's constructor type-checks every sub-processor named in its ``__init__``
    signature; narrowing the signature is the supported way to leave one out."""
    from transformers import Qwen2_5_VLProcessor

    class LeverQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return LeverQwen2_5_VLProcessor


def image_processor_from(directory: Path, min_pixels: int, max_pixels: int):
    """Qwen2-VL's image processor, PIL backend, configured from ``preprocessor_config.json`` with
    the plan's pixel bounds."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(str(directory), min_pixels=min_pixels, max_pixels=max_pixels)


def chat_template_from(directory: Path, tokenizer: Any) -> str:
    """The repo's chat template: ``chat_template.jinja``, else ``chat_template.json`` (the hub's
    Qwen2.5-VL layout), else the tokenizer config's."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    js = directory / "chat_template.json"
    if js.is_file():
        try:
            return json.loads(js.read_text(encoding="utf-8"))["chat_template"]
        except (ValueError, KeyError) as exc:
            raise StageError(f"{js}: no 'chat_template' string ({exc})") from None
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise StageError(f"{directory}: no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)")


def load_qwen_processor(directory: Path, min_pixels: int, max_pixels: int):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.padding_side = "left"
    return processor_class()(
        image_processor=image_processor_from(directory, min_pixels, max_pixels),
        tokenizer=tokenizer,
        chat_template=chat_template_from(directory, tokenizer),
    )


def load_qwen(directory: Path, dtype: torch.dtype, device: torch.device, min_pixels: int, max_pixels: int):
    """(model, processor) of a Qwen2.5-VL directory; errors a user can fix exit 2."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    try:
        processor = load_qwen_processor(directory, min_pixels, max_pixels)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(directory), dtype=dtype, attn_implementation="sdpa", local_files_only=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise StageError(f"lvlm.name: cannot load Qwen2.5-VL from {directory}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return model.to(device).eval(), processor
