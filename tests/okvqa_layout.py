"""A small dataset in the real OK-VQA file layout, for the cluster-route tests.

What the real folder has and the synthetic generator does not: COCO file names
(``train2014/COCO_train2014_000000xxxxxx.jpg``), JPEGs in every mode COCO ships (RGB, grayscale,
CMYK), many images no question references, and the official JSON envelopes (``info``,
``license``, ``data_subtype``; annotations with ``answer_confidence``, ``raw_answer``,
``question_type``).  Questions ask about a drawn shape's colour and shape, with ten annotator
answers each, so the tiny models have something learnable.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
SPLITS = {"train": ("train2014", 1000), "val": ("val2014", 500000)}


def _draw(rng: random.Random, color: str, shape: str, size: tuple[int, int]) -> Image.Image:
    img = Image.new("RGB", size, (245, 245, 240))
    d = ImageDraw.Draw(img)
    w, h = size
    x0, y0 = rng.randint(4, w // 3), rng.randint(4, h // 3)
    x1, y1 = x0 + w // 2, y0 + h // 2
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=fill)
    else:
        d.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
    return img


def _save(img: Image.Image, path: Path, mode: str) -> None:
    if mode == "L":
        img = img.convert("L")
    elif mode == "CMYK":
        img = img.convert("CMYK")
    img.save(path, format="JPEG", quality=90)


def write_okvqa(root: Path, n_train: int = 40, n_val: int = 16, seed: int = 0, extra_images: int = 6) -> dict:
    """Write both splits under ``root``; returns {split: {"questions": n, "images": n, "modes": {...}}}."""
    rng = random.Random(seed)
    root = Path(root)
    summary = {}
    for split, n in (("train", n_train), ("val", n_val)):
        folder, base = SPLITS[split]
        img_dir = root / folder
        img_dir.mkdir(parents=True, exist_ok=True)
        questions, annotations, modes = [], [], {"RGB": 0, "L": 0, "CMYK": 0}
        image_id = base
        while len(questions) < n:
            image_id += rng.randint(1, 9)
            color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
            size = rng.choice([(96, 72), (72, 96), (88, 88)])
            mode = ("RGB", "L", "CMYK")[len(questions) % 3] if len(questions) < 9 else "RGB"
            modes[mode] += 1
            _save(_draw(rng, color, shape, size), img_dir / f"COCO_{folder}_{image_id:012d}.jpg", mode)
            asks = [("what color is the shape?", color, "color"), ("what shape is shown?", shape, "shape")]
            for k, (q, a, qtype) in enumerate(asks[: min(2, n - len(questions))]):
                qid = image_id * 10 + k
                raw = [a] * 8 + [rng.choice([a, "unknown"]), rng.choice(sorted(COLORS) + list(SHAPES))]
                questions.append({"image_id": image_id, "question": q.capitalize(), "question_id": qid})
                annotations.append({
                    "image_id": image_id, "answer_type": "other", "question_type": qtype, "question_id": qid,
                    "answers": [{"answer_id": i + 1, "raw_answer": r, "answer_confidence": "yes", "answer": r}
                                for i, r in enumerate(raw)],
                    "confidence": 3,
                })
        for _ in range(extra_images):  # images no question references
            image_id += rng.randint(1, 9)
            _save(_draw(rng, "blue", "square", (64, 64)), img_dir / f"COCO_{folder}_{image_id:012d}.jpg", "RGB")
        info = {"description": "OK-VQA layout test fixture", "version": "1.0", "year": 2019}
        lic = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons Attribution 4.0"}
        (root / f"OpenEnded_mscoco_{folder}_questions.json").write_text(json.dumps(
            {"info": info, "license": lic, "data_subtype": folder, "task_type": "Open-Ended",
             "data_type": "mscoco", "questions": questions}))
        (root / f"mscoco_{folder}_annotations.json").write_text(json.dumps(
            {"info": info, "license": lic, "data_subtype": folder, "data_type": "mscoco",
             "annotations": annotations}))
        summary[split] = {"questions": len(questions), "images": len(list(img_dir.iterdir())), "modes": modes}
    return summary
