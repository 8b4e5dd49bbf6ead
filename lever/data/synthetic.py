"""Synthetic VQA data in the *official* OKVQA/VQAv2 file format.

The tiny profile and the tests cannot download OKVQA, so we draw scenes with PIL (1-5 copies of one
shape in one colour on a coloured background) and ask questions about them with ten noisy
annotator answers each. The files mimic the official layout exactly (questions JSON, annotations
JSON, ``COCO_<split>2014_<12-digit id>`` image names) so that ``prepare-data`` indexes them with the
same loader it uses for the real data. Annotator noise is deliberate: surface variants ("two",
"2.", "a circle") only agree after VQA normalization, and a few wrong or synonym answers ("grey")
keep accuracies below 1, so the metric is exercised the way real annotations exercise it.

Everything is a pure function of (seed, sizes): the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lever.data.io import atomic_write_bytes, atomic_write_text

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
# Synonyms annotators use that VQA normalization does NOT merge (so they count as different answers).
SYNONYMS: dict[str, str] = {"gray": "grey", "purple": "violet", "square": "box", "diamond": "rhombus"}
QUESTION_TYPES = ("color", "count", "shape", "background")
ANNOTATORS = 10
WRONG_RATE = 0.1
SYNONYM_RATE = 0.08

SPLIT_BASE_IMAGE_ID = {"train": 100_000, "val": 500_000}
SPLIT_COCO_NAME = {"train": "train2014", "val": "val2014"}


@dataclass(frozen=True)
class SyntheticLayout:
    """Where the generated official-format files live inside a directory."""

    root: Path

    def questions(self, split: str) -> Path:
        return self.root / "annotations" / f"OpenEnded_mscoco_{SPLIT_COCO_NAME[split]}_questions.json"

    def annotations(self, split: str) -> Path:
        return self.root / "annotations" / f"mscoco_{SPLIT_COCO_NAME[split]}_annotations.json"

    def images(self, split: str) -> Path:
        return self.root / "images" / SPLIT_COCO_NAME[split]


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    count: int
    background: str


def image_filename(split: str, image_id: int, suffix: str = ".png") -> str:
    return f"COCO_{SPLIT_COCO_NAME[split]}_{image_id:012d}{suffix}"


def _question_text(qtype: str, scene: Scene) -> tuple[str, str, str]:
    """(question, true answer, answer_type) for a question type about a scene."""
    plural = scene.count > 1
    if qtype == "color":
        q = f"What color are the {scene.shape}s?" if plural else f"What color is the {scene.shape}?"
        return q, scene.color, "other"
    if qtype == "count":
        return f"How many {scene.shape}s are there?", str(scene.count), "number"
    if qtype == "shape":
        return "What shape is shown?", scene.shape, "other"
    if qtype == "background":
        return "What color is the background?", scene.background, "other"
    raise ValueError(f"unknown question type {qtype!r}")


def _surface_forms(answer: str, qtype: str) -> list[str]:
    """Spellings of the true answer that VQA normalization maps back onto it (canonical first)."""
    if qtype == "count":
        n = int(answer)
        return [answer, NUMBER_WORDS[n], NUMBER_WORDS[n].capitalize(), f"{answer}."]
    forms = [answer, answer.capitalize(), f"{answer}."]
    if qtype == "shape":
        forms.append(f"a {answer}")
    else:
        forms.append(f"the {answer}")
    return forms


def _wrong_answers(answer: str, qtype: str) -> list[str]:
    if qtype == "count":
        return [str(n) for n in range(1, 6) if str(n) != answer]
    pool = {"color": COLORS, "background": BACKGROUNDS, "shape": SHAPES}[qtype]
    return [v for v in pool if v != answer]


def _annotate(rng: np.random.Generator, answer: str, qtype: str) -> list[str]:
    """Ten annotator answers: mostly the truth (in several spellings), a few synonyms or errors."""
    forms = _surface_forms(answer, qtype)
    wrong = _wrong_answers(answer, qtype)
    out = []
    for _ in range(ANNOTATORS):
        u = float(rng.random())
        if u < WRONG_RATE:
            out.append(wrong[int(rng.integers(len(wrong)))])
        elif u < WRONG_RATE + SYNONYM_RATE and answer in SYNONYMS:
            out.append(SYNONYMS[answer])
        elif u < 0.6:
            out.append(forms[0])
        else:
            out.append(forms[int(rng.integers(len(forms)))])
    return out


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(rng: np.random.Generator, scene: Scene, size: int) -> Image.Image:
    """Draw ``scene.count`` copies of the shape in distinct cells of a 3x3 grid (never overlapping)."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = size / 3.0
    cells = rng.choice(9, size=scene.count, replace=False)
    for c in sorted(int(x) for x in cells):
        row, col = divmod(c, 3)
        jitter = rng.uniform(-0.1, 0.1, size=2) * cell
        r = cell * float(rng.uniform(0.28, 0.4))
        _draw_shape(draw, scene.shape, (col + 0.5) * cell + jitter[0], (row + 0.5) * cell + jitter[1], r, COLORS[scene.color])
    return img


def _random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        color=list(COLORS)[int(rng.integers(len(COLORS)))],
        count=int(rng.integers(1, 6)),
        background=list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
    )


def generate_split(split: str, n_questions: int, image_size: int, seed: int) -> tuple[dict[str, Any], dict[str, Any], dict[int, Image.Image]]:
    """Build (questions JSON, annotations JSON, image_id -> image) for one split.

    Each image carries one or two questions of distinct types; question_id = image_id * 10 + k,
    as in OKVQA. The split index is mixed into the seed so train and val differ.
    """
    rng = np.random.default_rng([seed, list(SPLIT_BASE_IMAGE_ID).index(split)])
    questions: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    images: dict[int, Image.Image] = {}
    image_id = SPLIT_BASE_IMAGE_ID[split]
    while len(questions) < n_questions:
        image_id += int(rng.integers(1, 4))
        scene = _random_scene(rng)
        images[image_id] = render_scene(rng, scene, image_size)
        n_q = min(int(rng.integers(1, 3)), n_questions - len(questions))
        qtypes = rng.choice(len(QUESTION_TYPES), size=n_q, replace=False)
        for k, qt in enumerate(int(x) for x in qtypes):
            qtype = QUESTION_TYPES[qt]
            text, answer, answer_type = _question_text(qtype, scene)
            qid = image_id * 10 + k
            raw = _annotate(rng, answer, qtype)
            questions.append({"image_id": image_id, "question": text, "question_id": qid})
            annotations.append({
                "image_id": image_id,
                "question_id": qid,
                "question_type": qtype,
                "answer_type": answer_type,
                "answers": [
                    {"answer_id": i + 1, "raw_answer": a, "answer_confidence": "yes", "answer": a}
                    for i, a in enumerate(raw)
                ],
                "confidence": 3,
            })
    coco = SPLIT_COCO_NAME[split]
    info = {"description": "Lever synthetic shapes VQA (OKVQA format)", "version": "1.0", "seed": seed}
    q_json = {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": coco, "questions": questions}
    a_json = {"info": info, "data_type": "mscoco", "data_subtype": coco, "annotations": annotations}
    return q_json, a_json, images


def _png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_synthetic(root: Path, n_train: int, n_val: int, image_size: int, seed: int) -> SyntheticLayout:
    """Write both splits in the official layout under ``root`` and return where they are."""
    layout = SyntheticLayout(Path(root))
    for split, n in (("train", n_train), ("val", n_val)):
        q_json, a_json, images = generate_split(split, n, image_size, seed)
        img_dir = layout.images(split)
        img_dir.mkdir(parents=True, exist_ok=True)
        for image_id, img in images.items():
            atomic_write_bytes(img_dir / image_filename(split, image_id), _png_bytes(img))
        atomic_write_text(layout.questions(split), json.dumps(q_json, ensure_ascii=False))
        atomic_write_text(layout.annotations(split), json.dumps(a_json, ensure_ascii=False))
    return layout


def vocabulary() -> list[str]:
    """Every word the generator can emit in a question or answer, lowercased and sorted.

    The tiny CLIP tokenizer is built from this list, so it must cover the generator exactly;
    punctuation tokens are included because the whitespace pre-tokenizer splits them off.
    """
    words: set[str] = set()
    texts: list[str] = []
    for shape in SHAPES:
        for count in (1, 2):
            scene = Scene(shape, "red", count, "white")
            for qt in QUESTION_TYPES:
                texts.append(_question_text(qt, scene)[0])
    values = list(SHAPES) + list(COLORS) + list(BACKGROUNDS) + list(SYNONYMS.values())
    values += [str(n) for n in range(0, 11)] + list(NUMBER_WORDS) + ["a", "an", "the"]
    texts.extend(values)
    for text in texts:
        words.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    words.update({".", ",", "?", "!"})
    return sorted(words)
