"""A tiny, offline Qwen2.5-VL: the real transformers architecture with seeded random weights.

Why: the tiny profile and the tests must exercise exactly the code path the cluster runs
(chat template, image processor, vision tokens, 3-D rotary positions, answer masking) without a
hub download.  So we build ``Qwen2_5_VLForConditionalGeneration`` from a small config, a byte-level
BPE tokenizer trained here on a fixed word list (so any string tokenizes, and common words of the
synthetic dataset are single tokens), Qwen's special tokens with ids inside the vocabulary, a
Qwen-style chat template and a real ``Qwen2_5_VLProcessor``.  Everything is a pure function of the
LVLM config, so two processes build bit-identical models.

Optionally (``LVLMConfig.warmup_steps`` > 0, see :mod:`lever.models.warmup`) the model is briefly
fine-tuned on synthetic in-context QA so that some answers come out right; otherwise every
candidate would be judged wrong and RL rewards would have zero variance.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from lever.config.schema import LVLMConfig

log = logging.getLogger(__name__)

# Order fixes the ids (0..6): the trainer assigns special tokens first.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# A Qwen2.5-VL-style template: default system turn, one user turn whose content interleaves
# images (vision_start, one image_pad that the processor expands, vision_end) and text, and the
# assistant generation prompt.  Kept byte-compatible with the layout of Qwen's own template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Words the tokenizer learns as whole tokens: prompt scaffolding, and the vocabulary of the
# synthetic OKVQA-format dataset (colours, shapes, counts, positions, question words).  Anything
# else still tokenizes through the byte alphabet.
_WORDS = """
Question Short answer Answer You are a helpful assistant system user
what which how many much is are the an of color colour shape in image picture photo there this
that these those left right top bottom center centre middle background foreground large small big
tiny yes no object objects thing things does do have has kind type number size side on at and or
to with it its shown visible most least more fewer than same different both any all none count
red green blue yellow orange purple pink brown black white gray grey cyan magenta gold silver
circle circles square squares triangle triangles rectangle rectangles star stars ellipse oval
diamond cross hexagon line lines dot dots shapes ring rings heart hearts violet box rhombus
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty code word
""".split()


def _words() -> list[str]:
    """_WORDS plus the planted task's code words (lever.data.synthetic), each a single token."""
    from lever.data.synthetic import CODE_WORDS

    return list(_WORDS) + list(CODE_WORDS)


def _corpus() -> list[str]:
    """Training lines for the BPE merges: each word alone, with a leading space, capitalized,
    plus digits/numbers and the prompt scaffolding as it appears in real prompts."""
    lines: list[str] = []
    for w in _words():
        lines += [w, " " + w, w.capitalize(), " " + w.capitalize(), w + "?", " " + w + "?"]
    for n in range(0, 101):
        lines += [str(n), " " + str(n)]
    lines += [
        "Question:what color is the circle? Short answer:red",
        "Question:how many squares are there? Short answer:3",
        "You are a helpful assistant.",
        "system\n", "user\n", "assistant\n",
    ]
    return lines * 4  # frequencies >1 so every word's merges are learnt


def build_tokenizer():
    """The project's own fast tokenizer: byte-level BPE (lossless round trip, any string)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    for i, t in enumerate(SPECIAL_TOKENS):  # ids fixed and inside the vocabulary
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    fast.padding_side = "left"
    return fast


def tiny_config(vocab_size: int):
    """The tiny Qwen2.5-VL config of ENVIRONMENT.md (about 0.6M parameters)."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            pad_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            bos_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            fullatt_block_indexes=[1],
            window_size=112,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    return cfg


def image_processor(min_pixels: int, max_pixels: int):
    """Qwen2-VL's image processor; the PIL backend when torchvision is absent (it is here)."""
    try:
        import torchvision  # noqa: F401
        from transformers import Qwen2VLImageProcessor as cls
    except Exception:  # torchvision missing or broken beside the CPU torch build
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    return cls(min_pixels=min_pixels, max_pixels=max_pixels)


def _processor_class():
    """``Qwen2_5_VLProcessor`` without its video processor.

    Why: transformers' video processor needs torchvision, which does not import beside the CPU
    torch build (ENVIRONMENT.md); the processor's constructor type-checks every sub-processor named
    in ``__init__``'s signature, so we narrow the signature.  Text and image handling are the real
    class's code; videos are never used by Lever.
    """
    from transformers import Qwen2_5_VLProcessor

    class TinyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return TinyQwen2_5_VLProcessor


def build_processor(min_pixels: int, max_pixels: int):
    tokenizer = build_tokenizer()
    return _processor_class()(
        image_processor=image_processor(min_pixels, max_pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_qwen(cfg: "LVLMConfig"):
    """(model, processor) for ``lvlm.kind == tiny_qwen2_5_vl``; identical for equal configs.

    Weights are drawn under ``cfg.seed`` inside a forked RNG so the caller's global stream is
    untouched.  fp32 on CPU; the model is returned in eval mode.  If ``cfg.warmup_steps`` > 0 the
    warm-up fine-tune of :mod:`lever.models.warmup` is applied (cached on disk).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = build_processor(cfg.min_pixels, cfg.max_pixels)
    mcfg = tiny_config(len(processor.tokenizer))
    mcfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2_5_VLForConditionalGeneration(mcfg)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.do_sample = False
    model.eval()
    if getattr(cfg, "warmup_steps", 0) > 0:
        from lever.models.warmup import apply_warmup

        apply_warmup(model, processor, cfg)
    return model, processor
