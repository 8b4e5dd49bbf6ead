"""Synthetic VQA data in the *official* OKVQA/VQAv2 file format.

The tiny profile and the tests cannot download OKVQA, so we draw scenes with PIL (1-4 copies of one
shape in one colour on a coloured background) and ask questions about them with ten noisy
annotator answers each. The files mimic the official layout exactly (questions JSON, annotations
JSON, ``COCO_<split>2014_<12-digit id>`` image names) so that ``prepare-data`` indexes them with the
same loader it uses for the real data. Annotator noise is deliberate: surface variants ("two",
"2.", "a circle") only agree after VQA normalization, and a few wrong or synonym answers ("grey")
keep accuracies below 1, so the metric is exercised the way real annotations exercise it.

**The planted task** (the testbed of a selector). A share of the questions (``planted_fraction``)
asks "What is the code word?" about an ordinary scene. Its answer is an arbitrary word tied to the
shapes' colour by a mapping drawn per dataset seed (``code_words``), so neither the image nor the
text reveals it: the LVLM can only take it from demonstrations, and it answers with the word that
most of the shown planted demonstrations carry (what the tiny LVLM's warm-up teaches, under
mappings drawn afresh per prompt so it cannot memorise the evaluated one). A fraction
``planted_noise`` of planted questions carries another word, as real annotations disagree, so one
demonstration of the query's colour is weaker evidence than several. Which ICDs a selector shows
thus decides correctness, with a known optimum: the ``oracle`` inference reference shows planted
demonstrations of the query's colour. Image similarity sees the colour only partly (background,
count and shape move a CLIP-style embedding too) and never the question, so retrieval is a real
reference that a selector, which also sees the question, can beat.

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

#: bump when a change alters what the generator draws for the same seed (the tiny LVLM's cached
#: warm-up, trained on a private generated split, is keyed by it)
GENERATOR_VERSION = 5

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
#: shapes per scene (1..MAX_COUNT, one per cell of a 2x2 grid)
MAX_COUNT = 4
# Synonyms annotators use that VQA normalization does NOT merge (so they count as different answers).
SYNONYMS: dict[str, str] = {"gray": "grey", "purple": "violet", "square": "box", "diamond": "rhombus"}
ORDINARY_TYPES = ("color", "count", "shape", "background")
#: the planted question type: its answer is ``code_words(seed)[scene.color]``
PLANTED_TYPE = "code"
QUESTION_TYPES = ORDINARY_TYPES + (PLANTED_TYPE,)
PLANTED_QUESTION = "What is the code word?"
#: the attribute of a scene that decides the planted answer (and that the oracle matches on)
PLANTED_ATTRIBUTE = "color"
#: nonsense words the planted answers are drawn from (single tokens of the tiny LVLM's tokenizer);
#: a dataset maps its colours onto some of them, the warm-up onto fresh draws per prompt
CODE_WORDS: tuple[str, ...] = ("zorp", "blick", "dax", "wug", "fep", "toma", "kiki", "glim", "vorn",
                               "plonk", "mib", "tazz")
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


def code_words(seed: int) -> dict[str, str]:
    """The dataset's planted mapping colour -> code word: a seeded draw of distinct words, the same
    for both splits of one dataset (so train demonstrations carry the answers val queries need)."""
    rng = np.random.default_rng([seed, 0xC0DE])
    words = [CODE_WORDS[int(i)] for i in rng.permutation(len(CODE_WORDS))[: len(COLORS)]]
    return dict(zip(COLORS, words))


def _other_word(rng: np.random.Generator, word: str, mapping: dict[str, str]) -> str:
    """A planted question whose annotators agree on another of the dataset's code words."""
    others = [w for w in mapping.values() if w != word]
    return others[int(rng.integers(len(others)))]


def planted_value(scene: Scene) -> str:
    """The scene's value of the planted attribute (what a matching demonstration shares)."""
    return getattr(scene, PLANTED_ATTRIBUTE)


def image_filename(split: str, image_id: int, suffix: str = ".png") -> str:
    return f"COCO_{SPLIT_COCO_NAME[split]}_{image_id:012d}{suffix}"


def _question_text(qtype: str, scene: Scene, mapping: dict[str, str] | None = None) -> tuple[str, str, str]:
    """(question, true answer, answer_type) for a question type about a scene; the planted type
    needs the dataset's colour -> code word ``mapping``."""
    plural = scene.count > 1
    if qtype == PLANTED_TYPE:
        if mapping is None:
            raise ValueError("the planted question needs a colour -> code word mapping")
        return PLANTED_QUESTION, mapping[scene.color], "other"
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
        return [str(n) for n in range(1, MAX_COUNT + 1) if str(n) != answer]
    pool = {"color": COLORS, "background": BACKGROUNDS, "shape": SHAPES, PLANTED_TYPE: CODE_WORDS}[qtype]
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
    """Draw ``scene.count`` copies of the shape in distinct cells of a 2x2 grid (never overlapping).

    The shapes fill a good part of their cells, so the colour is a large share of the pixels: a
    CLIP-style embedding then carries it strongly enough for a selector to learn to match it in a
    few hundred steps, while count, shape and background still move the embedding, so plain image
    similarity confuses colours part of the time."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = size / 2.0
    cells = rng.choice(4, size=scene.count, replace=False)
    for c in sorted(int(x) for x in cells):
        row, col = divmod(c, 2)
        jitter = rng.uniform(-0.08, 0.08, size=2) * cell
        r = cell * float(rng.uniform(0.38, 0.48))
        _draw_shape(draw, scene.shape, (col + 0.5) * cell + jitter[0], (row + 0.5) * cell + jitter[1], r, COLORS[scene.color])
    return img


def _random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        color=list(COLORS)[int(rng.integers(len(COLORS)))],
        count=int(rng.integers(1, MAX_COUNT + 1)),
        background=list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
    )


def _planted_image_share(planted_fraction: float) -> float:
    """Share of images to give the (single) planted question so that ``planted_fraction`` of all
    questions are planted, given that other images carry 1.5 ordinary questions on average."""
    f = planted_fraction
    return 1.5 * f / (1.0 + 0.5 * f)


def _question_types(rng: np.random.Generator, planted_share: float, room: int) -> list[str]:
    """Question types of one image: the planted question alone, or 1-2 distinct ordinary ones."""
    if planted_share > 0 and float(rng.random()) < planted_share:
        return [PLANTED_TYPE]
    n_q = min(int(rng.integers(1, 3)), room)
    return [ORDINARY_TYPES[int(i)] for i in rng.choice(len(ORDINARY_TYPES), size=n_q, replace=False)]


def generate_split(split: str, n_questions: int, image_size: int, seed: int,
                   planted_fraction: float = 0.0, planted_noise: float = 0.0) -> tuple[dict[str, Any], dict[str, Any], dict[int, Image.Image]]:
    """Build (questions JSON, annotations JSON, image_id -> image) for one split.

    Each image carries the planted question alone or one or two ordinary questions of distinct
    types; question_id = image_id * 10 + k, as in OKVQA. The split index is mixed into the seed so
    train and val differ; the planted mapping depends on the seed only, so both splits share it.
    Annotations carry ``question_type`` and, beyond the official fields, the scene's
    ``planted_value`` (its colour), which only the oracle reference reads.
    """
    rng = np.random.default_rng([seed, list(SPLIT_BASE_IMAGE_ID).index(split)])
    # label noise draws from its own stream, so the noise level changes answers and nothing else
    noise_rng = np.random.default_rng([seed, list(SPLIT_BASE_IMAGE_ID).index(split), 0x501])
    mapping = code_words(seed)
    planted_share = _planted_image_share(planted_fraction)
    questions: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    images: dict[int, Image.Image] = {}
    image_id = SPLIT_BASE_IMAGE_ID[split]
    while len(questions) < n_questions:
        image_id += int(rng.integers(1, 4))
        scene = _random_scene(rng)
        images[image_id] = render_scene(rng, scene, image_size)
        for k, qtype in enumerate(_question_types(rng, planted_share, n_questions - len(questions))):
            text, answer, answer_type = _question_text(qtype, scene, mapping)
            if qtype == PLANTED_TYPE and float(noise_rng.random()) < planted_noise:
                answer = _other_word(noise_rng, answer, mapping)
            qid = image_id * 10 + k
            raw = _annotate(rng, answer, qtype)
            questions.append({"image_id": image_id, "question": text, "question_id": qid})
            annotations.append({
                "image_id": image_id,
                "question_id": qid,
                "question_type": qtype,
                "answer_type": answer_type,
                "planted_value": planted_value(scene),
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


def write_synthetic(root: Path, n_train: int, n_val: int, image_size: int, seed: int,
                    planted_fraction: float = 0.0, planted_noise: float = 0.0) -> SyntheticLayout:
    """Write both splits in the official layout under ``root`` and return where they are."""
    layout = SyntheticLayout(Path(root))
    for split, n in (("train", n_train), ("val", n_val)):
        q_json, a_json, images = generate_split(split, n, image_size, seed, planted_fraction, planted_noise)
        img_dir = layout.images(split)
        img_dir.mkdir(parents=True, exist_ok=True)
        for image_id, img in images.items():
            atomic_write_bytes(img_dir / image_filename(split, image_id), _png_bytes(img))
        atomic_write_text(layout.questions(split), json.dumps(q_json, ensure_ascii=False))
        atomic_write_text(layout.annotations(split), json.dumps(a_json, ensure_ascii=False))
    return layout


def planted_labels(layout: SyntheticLayout) -> dict[int, tuple[str, str]]:
    """question_id -> (question type, the value that decides its answer) for both splits of a
    generated set: the planted attribute (the colour) for planted questions, the canonical answer
    for ordinary ones.

    Only the oracle reference reads these: they are the knowledge no real selector has.
    """
    from collections import Counter

    from lever.metrics import normalize_answer

    labels: dict[int, tuple[str, str]] = {}
    for split in SPLIT_COCO_NAME:
        doc = json.loads(layout.annotations(split).read_text(encoding="utf-8"))
        for ann in doc["annotations"]:
            if "planted_value" not in ann:
                raise ValueError(f"{layout.annotations(split)}: question_id {ann.get('question_id')} has no "
                                 "planted_value (generated before the planted task existed?)")
            qtype = str(ann["question_type"])
            answers = Counter(normalize_answer(a["answer"]) for a in ann["answers"])
            key = str(ann["planted_value"]) if qtype == PLANTED_TYPE else answers.most_common(1)[0][0]
            labels[int(ann["question_id"])] = (qtype, key)
    return labels


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
            for qt in ORDINARY_TYPES:
                texts.append(_question_text(qt, scene)[0])
    texts.append(PLANTED_QUESTION)
    values = list(SHAPES) + list(COLORS) + list(BACKGROUNDS) + list(SYNONYMS.values()) + list(CODE_WORDS)
    values += [str(n) for n in range(0, 11)] + list(NUMBER_WORDS) + ["a", "an", "the"]
    texts.extend(values)
    for text in texts:
        words.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    words.update({".", ",", "?", "!"})
    return sorted(words)
