"""Write a model in the file layout its Hugging Face hub repository uses.

Why: the ``cluster`` profile loads Qwen2.5-VL and CLIP with ``from_pretrained`` from directories
laid out like ``Qwen/Qwen2.5-VL-3B-Instruct`` and ``openai/clip-vit-base-patch32``.  Those
directories differ from what ``save_pretrained`` writes today (a flat legacy ``config.json``, a
``Qwen2Tokenizer`` tokenizer config, the chat template in ``chat_template.json``, a
``generation_config.json`` that turns on a repetition penalty, sharded weights with legacy key
names), and each difference once broke the cluster path while the tiny path stayed green.  This
module writes the tiny models in exactly that layout, so the tests, ``scripts/gpu_smoke.sh`` and a
new user can run the cluster code routes offline.  The file shapes follow the published repos;
the values that depend on the vocabulary (token ids) come from the model being written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from lever.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # transformers is heavy; the annotation only names its config class
    from transformers import Qwen2_5_VLConfig

# Qwen2.5-VL's chat template as the hub repo ships it (chat_template.json): a default system
# turn, "Picture N:" labels only with add_vision_id, and <|im_end|> after every turn.
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2/2.5 repo): single digits, letters
# with one leading non-letter, punctuation runs, newlines apart from other whitespace.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# preprocessor_config.json of Qwen/Qwen2.5-VL-3B-Instruct (pixel bounds are the hub's; Lever's
# config passes its own min/max pixels when it builds the processor)
QWEN25_VL_PREPROCESSOR: dict[str, Any] = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

# The sampling fields of the hub's generation_config.json: do_sample with a near-zero
# temperature and a 1.05 repetition penalty.  ``generate`` applies them unless the caller passes
# its own GenerationConfig; Lever always does (lever.models.decoding).
QWEN25_VL_HUB_SAMPLING: dict[str, Any] = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 1e-06}

# Qwen/Qwen2.5-VL-3B-Instruct's architecture (config.json), used by gpu_smoke.sh to build the
# full-size model with random weights when no real checkpoint is mounted.
QWEN25_VL_3B_TEXT: dict[str, Any] = {
    "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
    "num_key_value_heads": 2, "max_position_embeddings": 128000, "max_window_layers": 70, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True,
    "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    "vocab_size": 151936, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
QWEN25_VL_3B_VISION: dict[str, Any] = {
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
    "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
    "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
}

# special tokens the Qwen templates and processor name (the tiny tokenizer holds these seven)
_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, indent=2)


def _legacy_qwen_config(model_cfg: "Qwen2_5_VLConfig", dtype: str) -> dict[str, Any]:
    """The flat config.json of the hub repo: text fields at the top level, ``rope_scaling`` with
    ``type: mrope``, the vision tower's legacy field names."""
    text = model_cfg.text_config
    vision = model_cfg.vision_config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    section = list(rope.get("mrope_section", []))
    theta = rope.get("rope_theta", getattr(text, "rope_theta", 1000000.0))
    out: dict[str, Any] = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "vision_start_token_id": model_cfg.vision_start_token_id,
        "vision_end_token_id": model_cfg.vision_end_token_id,
        "image_token_id": model_cfg.image_token_id,
        "video_token_id": model_cfg.video_token_id,
        "hidden_act": text.hidden_act,
        "hidden_size": text.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "max_window_layers": getattr(text, "max_window_layers", text.num_hidden_layers),
        "model_type": "qwen2_5_vl",
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": theta,
        "sliding_window": 32768,
        "tie_word_embeddings": bool(model_cfg.tie_word_embeddings),
        "torch_dtype": dtype,
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": vision.depth,
            "hidden_act": vision.hidden_act,
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "num_heads": vision.num_heads,
            "in_chans": 3,
            "out_hidden_size": vision.out_hidden_size,
            "patch_size": vision.patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "spatial_patch_size": vision.patch_size,
            "window_size": vision.window_size,
            "fullatt_block_indexes": list(vision.fullatt_block_indexes),
            "tokens_per_second": 2,
            "temporal_patch_size": vision.temporal_patch_size,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": section},
        "vocab_size": text.vocab_size,
    }
    return out


def _qwen_tokenizer_files(tokenizer: Any, out: Path) -> None:
    """vocab.json, merges.txt, tokenizer.json and a ``Qwen2Tokenizer`` tokenizer_config.json.

    The BPE vocabulary and merges are the given tokenizer's; tokenizer.json gets Qwen2's
    normalizer (NFC) and pre-tokenizer (the Qwen2 split, then byte-level without its own regex),
    as in the hub repos, so the tokenization the cluster path sees is Qwen's scheme."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    added = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIAL}
    for tok, tid in added.items():
        vocab.pop(tok, None)
    backend["normalizer"] = {"type": "NFC"}
    backend["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ]}
    backend["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    backend["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    backend["added_tokens"] = [
        {"id": tid, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for tok, tid in sorted(added.items(), key=lambda kv: kv[1])
    ]
    _write_json(out / "tokenizer.json", backend)
    _write_json(out / "vocab.json", dict(sorted(vocab.items(), key=lambda kv: kv[1])))
    atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(tid): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": True}
            for tok, tid in sorted(added.items(), key=lambda kv: kv[1])
        },
        "additional_special_tokens": [t for t in _QWEN_SPECIAL if t != "<|endoftext|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })


def export_qwen(model: Any, tokenizer: Any, out: Path | str, *, dtype: str = "bfloat16",
                sampling: Optional[dict[str, Any]] = None, max_shard_size: str = "5GB") -> Path:
    """Write ``model`` (a ``Qwen2_5_VLForConditionalGeneration``) and ``tokenizer`` in the layout
    of the Qwen2.5-VL hub repos: weights as safetensors with legacy key names (sharded with an
    index when larger than ``max_shard_size``) in ``dtype``, a flat legacy config.json,
    generation_config.json with the hub's sampling fields (``sampling`` replaces them),
    preprocessor_config.json, chat_template.json and the Qwen2Tokenizer files."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    original = next(model.parameters()).dtype
    model.to(torch_dtype)
    try:
        model.save_pretrained(out, max_shard_size=max_shard_size)
    finally:
        model.to(original)
    _write_json(out / "config.json", _legacy_qwen_config(model.config, dtype))
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen = {"bos_token_id": pad, "pad_token_id": pad, "eos_token_id": [eos, pad],
           **(QWEN25_VL_HUB_SAMPLING if sampling is None else sampling), "transformers_version": "4.49.0"}
    _write_json(out / "generation_config.json", gen)
    _write_json(out / "preprocessor_config.json", QWEN25_VL_PREPROCESSOR)
    _write_json(out / "chat_template.json", {"chat_template": QWEN25_VL_CHAT_TEMPLATE})
    _qwen_tokenizer_files(tokenizer, out)
    return out


def export_tiny_qwen(out: Path | str, *, seed: int = 0, warmup_steps: int = 0, dtype: str = "bfloat16",
                     sampling: Optional[dict[str, Any]] = None, max_shard_size: str = "700KB") -> Path:
    """The tiny Qwen2.5-VL of ``lever.models.tiny_qwen`` in the hub layout (two weight shards by
    default, as the 3B repo has)."""
    from lever.config.schema import LVLMConfig
    from lever.models.tiny_qwen import build_tiny_qwen

    cfg = LVLMConfig(kind="tiny_qwen2_5_vl", name="tiny-qwen2.5-vl", dtype="float32", device="cpu",
                     seed=seed, warmup_steps=warmup_steps, min_pixels=3136, max_pixels=3136)
    model, processor = build_tiny_qwen(cfg)
    return export_qwen(model, processor.tokenizer, out, dtype=dtype, sampling=sampling, max_shard_size=max_shard_size)


def qwen_3b_random(tokenizer: Any):
    """``Qwen2_5_VLForConditionalGeneration`` with the 3B repo's architecture and random weights,
    special token ids taken from ``tokenizer`` (gpu_smoke.sh without a mounted checkpoint)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIAL}
    text = {k: v for k, v in QWEN25_VL_3B_TEXT.items()}
    text.update(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    vision = {k: v for k, v in QWEN25_VL_3B_VISION.items() if k not in ("in_chans", "spatial_patch_size")}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    return Qwen2_5_VLForConditionalGeneration(cfg)


# ----------------------------------------------------------------------------- CLIP

# preprocessor_config.json of openai/clip-vit-base-patch32 (the feature-extractor era keys)
CLIP_PREPROCESSOR: dict[str, Any] = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


def _clip_tokenizer(words: list[str]):
    """A CLIPTokenizer (byte-level BPE with ``</w>`` word ends, lower-cased) whose merges are
    learnt from ``words``; any text still tokenizes through the byte alphabet."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=1, special_tokens=[], show_progress=False,
                                  initial_alphabet=alphabet, end_of_word_suffix="</w>")
    tok.train_from_iterator([w.lower() for w in words] * 2, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for ch in alphabet:  # CLIP's vocabulary holds every byte both alone and as a word end
        for t in (ch, ch + "</w>"):
            if t not in vocab:
                vocab[t] = len(vocab)
    for t in ("<|startoftext|>", "<|endoftext|>"):
        vocab[t] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def export_clip(model: Any, tokenizer: Any, out: Path | str) -> Path:
    """``CLIPModel`` + ``CLIPTokenizer`` in the layout of openai/clip-vit-base-patch32:
    config.json, model.safetensors, the tokenizer files and the feature-extractor-era
    preprocessor_config.json (224 px crop)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    _write_json(out / "vocab.json", backend["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["merges"]]
    atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.update({"tokenizer_class": "CLIPTokenizer", "do_lower_case": True, "errors": "replace",
                "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    cfg.pop("backend", None)
    _write_json(out / "tokenizer_config.json", cfg)
    _write_json(out / "special_tokens_map.json", {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    _write_json(out / "preprocessor_config.json", CLIP_PREPROCESSOR)
    return out


def export_tiny_clip(out: Path | str, *, hidden_size: int = 32, projection_dim: int = 32, seed: int = 0) -> Path:
    """A seeded tiny CLIP (224 px input, patch 32, as ViT-B/32) in the hub layout."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from lever.data.synthetic import vocabulary

    words = list(vocabulary()) + ["what", "is", "the", "a", "of", "on", "in", "this", "how", "many", "color"]
    tokenizer = _clip_tokenizer(words)
    h = hidden_size
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32, num_channels=3),
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return export_clip(model.eval(), tokenizer, out)
