"""How an ICD sequence plus a query becomes one Qwen2.5-VL user turn.

Kept apart from the model code so that scoring, generation, the fast path and inference all
build byte-identical prompts.

Prompt order (used everywhere: InfoScore beams, RL data, inference): the ICDs appear in the
order of their sequence, ``icd_ids[0]`` first, and the query comes last.  During beam search the
ICD chosen at step t is therefore appended right before the query (the ICD chosen first is the
farthest from it).  This is the Lever-LM convention (the generated ICD sequence is the prompt
order), and it makes every partial beam a token prefix of its extensions, which the fast scoring
path exploits for key/value-cache reuse.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from PIL import Image

ICD_TEMPLATE = "Question:{question} Short answer:{answer}"
QUERY_TEMPLATE = "Question:{question} Short answer:"


@dataclass
class Example:
    """One ICD (answer set) or the query (answer None); ``image`` None = text only."""

    image: Optional[Union[Path, str, Image.Image]]
    question: str
    answer: Optional[str] = None


def example_text(ex: Example) -> str:
    if ex.answer is None:
        return QUERY_TEMPLATE.format(question=ex.question)
    return ICD_TEMPLATE.format(question=ex.question, answer=ex.answer)


def prompt_messages(prompt: Sequence[Example]) -> list[dict[str, Any]]:
    """One user turn, images and texts interleaved: [img, text] per ICD, then the query's."""
    if not prompt:
        raise ValueError("a prompt needs at least the query")
    if prompt[-1].answer is not None:
        raise ValueError("the last example of a prompt is the query and must have answer=None")
    for i, ex in enumerate(prompt[:-1]):
        if ex.answer is None:
            raise ValueError(f"ICD {i} of the prompt has no answer")
    content: list[dict[str, Any]] = []
    for ex in prompt:
        if ex.image is not None:
            content.append({"type": "image"})
        content.append({"type": "text", "text": example_text(ex)})
    return [{"role": "user", "content": content}]


def image_key(image: Union[Path, str, Image.Image]) -> Optional[str]:
    """Cache key of an image: its resolved path; in-memory images are not cached."""
    if isinstance(image, (str, Path)):
        return os.path.abspath(image)  # no filesystem calls: this runs for every prompt
    return None


def load_image(image: Union[Path, str, Image.Image]) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def answer_weights(gt_answers_raw: Sequence[str]) -> list[tuple[str, float]]:
    """(normalized answer, count/total) per distinct answer, first-seen order; empties dropped."""
    from lever.metrics import gt_answer_counts

    counts = {a: c for a, c in gt_answer_counts(list(gt_answers_raw)).items() if a}
    total = sum(counts.values())
    if total == 0:
        raise ValueError(f"no non-empty ground-truth answer in {list(gt_answers_raw)!r}")
    return [(a, c / total) for a, c in counts.items()]


def most_common_answer(gt_answers_raw: Sequence[str]) -> str:
    """The answer an ICD shows and the y of InfoScore: the most frequent VQA-normalized answer
    (ties: the first seen)."""
    weights = answer_weights(gt_answers_raw)
    best = max(w for _, w in weights)
    return next(a for a, w in weights if w == best)


def icd_example(rec: Any) -> Example:
    """A dataset record (``VQARecord``) as an ICD: image, question, most common answer."""
    return Example(rec.image_path, rec.question, most_common_answer(rec.answers))


def query_example(rec: Any) -> Example:
    return Example(rec.image_path, rec.question, None)


class LRU(OrderedDict):
    """A tiny LRU map (processed images, prompt token ids): bounded so long runs stay flat."""

    def __init__(self, maxsize: int = 4096) -> None:
        super().__init__()
        self.maxsize = maxsize

    def get_or(self, key, make):
        if key is None:
            return make()
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        if len(self) > self.maxsize:
            self.popitem(last=False)
        return value
