"""The LVLM interface (DESIGN.md) and its Qwen2.5-VL implementation (built by ``lever.models.factory``).

Two things matter for correctness here, both learnt from the reference code:

* ``answer_logprob`` averages the log-probabilities of the *answer tokens only*.  The answer span
  is found from the token ids of the actual templated sequence (system prompt, chat markers and
  expanded vision tokens included): we tokenize the prompt with its generation prompt and the
  full sequence (prompt + answer) and take the suffix.  The reference computed the mask length
  from text without the chat template and so scored template tokens for Qwen.
* Batches are left-padded and 3-D rotary positions are computed from the attention mask, so a
  batched call gives the same numbers as one-by-one calls (and ``generate`` the same tokens).

The end-of-turn token is *not* part of the scored answer: InfoScore and ``gt_prob`` are about the
answer text, as in the reference.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence, runtime_checkable

import torch

from lever.models.answer_scores import gt_prob, mean_token_logprob
from lever.models.image_cache import ImageCache
from lever.models.prompting import (
    LRU,
    Example,
    image_key,
    load_image,
    most_common_answer,
    prompt_messages,
)

if TYPE_CHECKING:  # pragma: no cover
    from lever.config.schema import LVLMConfig

__all__ = [
    "Example",
    "LVLM",
    "QwenVLM",
    "postprocess_generation",
    "most_common_answer",
]

log = logging.getLogger(__name__)


@runtime_checkable
class LVLM(Protocol):
    def answer_logprob(self, prompts: list[list[Example]], answers: list[str]) -> list[float]:
        """prompts[i] = ICDs..., query (last, answer None); mean log-prob of answers[i]'s tokens."""
        ...

    def generate(self, prompts: list[list[Example]], max_new_tokens: Optional[int] = None) -> list[str]:
        """Raw greedy generations (not post-processed)."""
        ...


_CUT = re.compile(r"Question|Answer|Short|\n")


def postprocess_generation(text: str) -> str:
    """The answer part of a raw generation: cut at Question|Answer|Short and newlines, strip."""
    return _CUT.split(text, maxsplit=1)[0].strip()


# ----------------------------------------------------------------------------- encoding


@dataclass
class ProcessedImage:
    """An image after Qwen's image processor: its patches and (t, h, w) grid."""

    key: Optional[str]
    pixel_values: torch.Tensor  # [n_patches, C*T*P*P]
    grid_thw: torch.Tensor  # [3]
    n_tokens: int  # LLM placeholder tokens after spatial merging
    grid: tuple[int, int, int] = field(init=False)  # grid_thw as ints, read for every scored prompt

    def __post_init__(self) -> None:
        t, h, w = (int(x) for x in self.grid_thw.tolist())
        self.grid = (t, h, w)


@dataclass
class Encoded:
    """One prompt (+ optional answer) as token ids of the real templated sequence."""

    ids: list[int]
    answer_start: int  # first answer token; == len(ids) without an answer
    images: list[ProcessedImage] = field(default_factory=list)

    @property
    def n_answer(self) -> int:
        return len(self.ids) - self.answer_start


class QwenVLM:
    """Qwen2.5-VL behind the LVLM protocol (real checkpoint or the tiny offline model)."""

    def __init__(self, model: Any, processor: Any, cfg: "LVLMConfig", device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.batch_size = cfg.batch_size
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")
        self.image_token_id = int(self.tokenizer.convert_tokens_to_ids(self.image_token))
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self.merge = int(getattr(self.image_processor, "merge_size", 2))
        self.turn_start = "<|im_start|>"
        self._added = {t: int(i) for t, i in self.tokenizer.get_added_vocab().items()}
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True)) + ")")
        self._pieces = LRU(maxsize=65536)
        self._segmented: Optional[bool] = None if self._added else False
        self._segment_checks = 0
        self._skeletons = LRU(maxsize=256)
        self._skeleton_checks: dict[tuple, int] = {}
        self._plans: dict[tuple, list[list[int]]] = {}
        self._plan_checks: dict[tuple, int] = {}
        # processed pixels, bounded in bytes (COCO-sized images are ~1-4 MB each in fp32)
        self._images = ImageCache(int(cfg.image_cache_mb * 2**20))
        self._keys = LRU(maxsize=65536)  # path as given -> cache key (strings only)
        self._prompt_ids = LRU(maxsize=4096)
        self.calls = 0  # forward passes, for telemetry

    # ------------------------------------------------------------------ text + images

    def _render(self, prompt: Sequence[Example]) -> str:
        return self.processor.apply_chat_template(
            prompt_messages(prompt), tokenize=False, add_generation_prompt=True
        )

    @staticmethod
    def _layout(prompt: Sequence[Example]) -> tuple:
        return tuple(ex.image is not None for ex in prompt) + (prompt[-1].answer is None,)

    def _skeleton(self, prompt: Sequence[Example], layout: tuple) -> list[str]:
        """The template of the prompt's ``layout`` (``_layout``: which examples have images),
        rendered once with sentinel texts and split around them: [part, "k", part, "k", ...,
        part]; [] if the sentinels did not survive rendering."""

        def render() -> list[str]:
            content: list[dict[str, Any]] = []
            for k, ex in enumerate(prompt):
                if ex.image is not None:
                    content.append({"type": "image"})
                content.append({"type": "text", "text": f"\x00{k}\x00"})
            rendered = self.processor.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            parts = rendered.split("\x00")
            return parts if len(parts) == 2 * len(prompt) + 1 else []

        return self._skeletons.get_or(layout, render)

    def prompt_text(self, prompt: Sequence[Example]) -> str:
        """The chat-templated prompt (one user turn, generation prompt), image pads unexpanded.

        Rendering a Jinja template per scored prompt is a visible cost, so the template is
        rendered once per layout (which examples have images) with sentinel texts, and the
        texts are spliced in; the first prompts of each layout are checked against a full render.
        """
        from lever.models.prompting import example_text

        layout = self._layout(prompt)
        parts = self._skeleton(prompt, layout)
        if not parts:
            return self._render(prompt)
        texts = [example_text(ex) for ex in prompt]
        out = [parts[0]]
        for k in range(len(prompt)):
            out.append(texts[int(parts[2 * k + 1])])
            out.append(parts[2 * k + 2])
        text = "".join(out)
        checks = self._skeleton_checks.get(layout, 0)
        if checks < 3:
            self._skeleton_checks[layout] = checks + 1
            if text != self._render(prompt):
                self._skeletons[layout] = []
                return self._render(prompt)
        return text

    def _segment_plan(self, prompt: Sequence[Example], layout: tuple) -> Optional[list[list[Optional[list[int]]]]]:
        """Token ids of the layout's template parts, when the prompt's ids are those parts' ids
        and its texts' ids laid end to end: every part that sits between two texts starts and
        ends with an added token, where the tokenizer splits the text anyway.  Each part is a
        list of runs: a list of ids, or None where an image's pads go.  None when that does not
        hold (then ``encode`` tokenizes the whole text)."""
        plan = self._plans.get(layout)
        if plan is None:
            parts = self._skeleton(prompt, layout)
            ok = bool(parts) and self._segmented is not False
            tmpl = parts[0::2] if ok else []
            order = [int(x) for x in parts[1::2]] if ok else []
            added = tuple(self._added)
            for k, part in enumerate(tmpl):
                starts = k == 0 or part.startswith(added)
                ends = k == len(tmpl) - 1 or part.endswith(added)
                ok = ok and starts and ends
            plan = []
            if ok and order == list(range(len(prompt))):
                for part in tmpl:
                    runs: list[Optional[list[int]]] = [[]]
                    for t in self._tokenize(part):
                        if t == self.image_token_id:
                            runs += [None, []]
                        else:
                            runs[-1].append(t)  # type: ignore[union-attr]
                    plan.append(runs)
            self._plans[layout] = plan
        return plan or None

    def _prompt_ids_of(self, prompt: Sequence[Example], images: list[ProcessedImage], layout: tuple) -> Optional[list[int]]:
        """The prompt's token ids from cached per-part and per-text ids, without building and
        re-tokenizing its text (which, with hundreds of image pads per image, is most of the
        cost of encoding a prompt); None when the layout does not allow it.  The first prompts
        of each layout are checked against whole-text tokenization."""
        from lever.models.prompting import example_text

        plan = self._segment_plan(prompt, layout)
        if plan is None:
            return None
        ids: list[int] = []
        img = 0
        for k, part in enumerate(plan):
            for run in part:
                if run is None:
                    ids.extend([self.image_token_id] * images[img].n_tokens)
                    img += 1
                else:
                    ids.extend(run)
            if k < len(prompt):
                text = example_text(prompt[k])
                ids.extend(self._pieces.get_or(text, lambda: self._tokenize(text)))
        checks = self._plan_checks.get(layout, 0)
        if checks < 3:
            self._plan_checks[layout] = checks + 1
            text = self._expand(self.prompt_text(prompt), images)
            if img != len(images) or ids != self._tokenize(text):
                log.warning("per-part tokenization differs from whole-text tokenization for layout %s; disabled", layout)
                self._plans[layout] = []
                return None
        return ids

    def process_image(self, image: Any) -> ProcessedImage:
        """Pixels and grid of an image, cached by path (bounded in bytes, pixels in the model
        dtype: they are cast to it before every forward anyway)."""
        if isinstance(image, (str, Path)):
            # resolving a path to its key is a visible cost at thousands of prompts: memoized
            # for absolute paths (a relative one depends on the working directory)
            key = self._keys.get_or(image, lambda: image_key(image)) if os.path.isabs(image) else image_key(image)
        else:
            key = None

        def make() -> ProcessedImage:
            out = self.image_processor(images=[load_image(image)], return_tensors="pt")
            grid = out["image_grid_thw"][0]
            pixels = out["pixel_values"].to(self.dtype)
            return ProcessedImage(key, pixels, grid, int(grid.prod().item()) // (self.merge**2))

        return self._images.get_or(key, make)

    def _expand(self, text: str, images: list[ProcessedImage]) -> str:
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(images):
            raise ValueError(f"prompt has {len(parts) - 1} image slots but {len(images)} images")
        out = [parts[0]]
        for img, rest in zip(images, parts[1:]):
            out.append(self.image_token * img.n_tokens)
            out.append(rest)
        return "".join(out)

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _ids(self, text: str) -> list[int]:
        """``_tokenize(text)`` from cached pieces.

        Added (special) tokens split a text before the tokenizer model sees it, so the ids of a
        prompt are the ids of its pieces between special tokens, and those pieces (an ICD's
        "Question:... Short answer:..." text) recur across thousands of scored prompts.  The
        first prompts are checked against whole-text tokenization; on any mismatch this falls
        back to it for good.
        """
        if self._segmented is False:
            return self._tokenize(text)
        ids: list[int] = []
        for piece in self._special_re.split(text):
            if not piece:
                continue
            sid = self._added.get(piece)
            if sid is not None:
                ids.append(sid)
            else:
                ids.extend(self._pieces.get_or(piece, lambda p=piece: self._tokenize(p)))
        if self._segment_checks < 16:
            self._segment_checks += 1
            if ids != self._tokenize(text):
                log.warning("piecewise tokenization differs from whole-text tokenization; disabled")
                self._segmented = False
                return self._tokenize(text)
        return ids

    def encode(self, prompt: Sequence[Example], answer: Optional[str] = None) -> Encoded:
        """Token ids of the templated prompt (+ answer), with the answer span from the ids.

        The full sequence is tokenized as one text (the way the model reads it); if that
        tokenization does not start with the prompt's own ids (a token merged across the
        boundary), the answer is tokenized alone and appended so the span stays exact.
        """
        images = [self.process_image(ex.image) for ex in prompt if ex.image is not None]
        layout = self._layout(prompt)
        prompt_ids = self._prompt_ids_of(prompt, images, layout)
        text: Optional[str] = None
        if prompt_ids is None:
            text = self._expand(self.prompt_text(prompt), images)
            prompt_ids = self._prompt_ids.get_or(text, lambda: self._ids(text))
        if answer is None:
            return Encoded(list(prompt_ids), len(prompt_ids), images)
        if not answer:
            raise ValueError("cannot score an empty answer")
        n = len(prompt_ids)
        full = self._tokenize_with_answer(prompt, layout, text, images, prompt_ids, answer)
        if len(full) <= n or full[:n] != prompt_ids:
            full = list(prompt_ids) + self._tokenize(answer)
        return Encoded(full, n, images)

    def _tokenize_with_answer(self, prompt: Sequence[Example], layout: tuple, text: Optional[str],
                              images: list[ProcessedImage], prompt_ids: list[int], answer: str) -> list[int]:
        """ids of the prompt's text + ``answer``, re-tokenizing only the last turn.

        Added special tokens split the text before the tokenizer model runs, so everything
        before the assistant turn's ``<|im_start|>`` tokenizes the same with or without the
        answer; only the tail from that token on needs tokenizing again.  The tail lies in the
        layout's last template part, so the prompt's text is only built when that fails (then
        the whole text + answer is tokenized).
        """
        last = self._skeleton(prompt, layout)[-1:] if text is None else [text]
        cut = last[0].rfind(self.turn_start) if last else -1
        if cut >= 0:
            tail = last[0][cut:]
            tail_ids = self._pieces.get_or(("tail", tail), lambda: self._tokenize(tail))
            k = len(tail_ids)
            if 0 < k <= len(prompt_ids) and prompt_ids[-k:] == tail_ids:
                with_answer = self._pieces.get_or(("tail", tail + answer), lambda: self._tokenize(tail + answer))
                return list(prompt_ids[:-k]) + list(with_answer)
        if text is None:
            text = self._expand(self.prompt_text(prompt), images)
        return self._tokenize(text + answer)

    # ------------------------------------------------------------------ batching

    def collate(self, batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """Left-padded model inputs with explicit 3-D rotary positions (padding-aware)."""
        length = max(len(e.ids) for e in batch)
        ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, length - len(e.ids):] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, length - len(e.ids):] = 1
        mm = (ids == self.image_token_id).to(torch.int) * mask.to(torch.int)
        images = [img for e in batch for img in e.images]
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm}
        if images:
            inputs["pixel_values"] = torch.cat([im.pixel_values for im in images]).to(self.dtype)
            inputs["image_grid_thw"] = torch.stack([im.grid_thw for im in images])
        return {k: v.to(self.device) for k, v in inputs.items()}

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        pos, _ = self.model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"],
        )
        return pos

    def _chunks(self, items: list[Encoded]):
        """Batches of similar length (sorted), yielding (original indices, encodings)."""
        order = sorted(range(len(items)), key=lambda i: (len(items[i].ids), i))
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            yield idx, [items[i] for i in idx]

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def token_logprobs(self, encoded: list[Encoded]) -> list[torch.Tensor]:
        """Per-answer-token log-probs (float32, CPU) of each encoded prompt+answer."""
        out: list[Optional[torch.Tensor]] = [None] * len(encoded)
        for idx, batch in self._chunks(encoded):
            inputs = self.collate(batch)
            keep = max(e.n_answer for e in batch) + 1
            logits = self.model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                position_ids=self.position_ids(inputs),
                pixel_values=inputs.get("pixel_values"),
                image_grid_thw=inputs.get("image_grid_thw"),
                logits_to_keep=keep,
                use_cache=False,
            ).logits
            self.calls += 1
            out_lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            targets = inputs["input_ids"][:, -(keep - 1):]
            lp = out_lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
            for row, (i, e) in enumerate(zip(idx, batch)):
                out[i] = lp[row, lp.shape[1] - e.n_answer:]
        return out  # type: ignore[return-value]

    def answer_logprob(self, prompts: list[list[Example]], answers: list[str]) -> list[float]:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        encoded = [self.encode(p, a) for p, a in zip(prompts, answers)]
        return [mean_token_logprob(t) for t in self.token_logprobs(encoded)]

    @torch.inference_mode()
    def generate(self, prompts: list[list[Example]], max_new_tokens: Optional[int] = None) -> list[str]:
        out: list[str] = [""] * len(prompts)
        for idx, _batch, _inputs, texts, _cache in self.generate_batches([self.encode(p) for p in prompts], max_new_tokens):
            for i, t in zip(idx, texts):
                out[i] = t
        return out

    def generation_config(self, max_new_tokens: int, return_dict: bool = False):
        """Greedy decoding, explicit in every field (lever.models.decoding): a greedy answer never
        depends on the checkpoint's generation_config.json."""
        from lever.models.decoding import greedy_config

        cfg = greedy_config(max_new_tokens, self.pad_id, self.tokenizer.eos_token_id)
        cfg.return_dict_in_generate = return_dict
        return cfg

    @torch.inference_mode()
    def generate_batches(self, encoded: list[Encoded], max_new_tokens: Optional[int] = None, keep_cache: bool = False):
        """Batched greedy generation, batch by batch: (indices, encodings, model inputs, texts,
        key/value cache or None).  ``keep_cache`` returns each batch's cache (the left-padded
        prompts, then the generated tokens), which the fast path scores answers on."""
        n_new = max_new_tokens or self.cfg.max_new_tokens
        config = self.generation_config(n_new, return_dict=keep_cache)
        for idx, batch in self._chunks(encoded):
            inputs = self.collate(batch)
            gen = self.model.generate(**inputs, generation_config=config)
            self.calls += 1
            seqs = gen.sequences if keep_cache else gen
            cache = None
            if keep_cache:  # ``cache`` in recent transformers, ``past_key_values`` before
                cache = getattr(gen, "cache", None)
                if cache is None:
                    cache = getattr(gen, "past_key_values", None)
            new = seqs[:, inputs["input_ids"].shape[1]:]
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            yield idx, batch, inputs, texts, cache

    def gt_prob(self, prompt: list[Example], gt_answers_raw: Sequence[str]) -> float:
        return gt_prob(self, prompt, gt_answers_raw)
