"""The normalized dataset index (``dataset.json``) and the loader for official OKVQA/VQAv2 files.

Every later stage refers to items by their *global id*: the position in the recorded order of
``dataset.json``. That order is fixed here, once (sorted by question_id), so shards, embeddings
and predictions written by different processes always agree on what id 17 means.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lever.data.io import atomic_write_json
from lever.errors import StageError

SCHEMA_VERSION = 1
DATASET_FILE = "dataset.json"
SPLITS = ("train", "val")
_IMAGE_ID_RE = re.compile(r"(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


@dataclass(frozen=True)
class VQARecord:
    question_id: int
    image_id: int
    question: str
    answers: list[str]
    image_path: Path


@dataclass
class DatasetIndex:
    """Both splits in recorded order; ``train[i]`` is the item with global id ``i``."""

    name: str
    train: list[VQARecord]
    val: list[VQARecord]
    source: dict[str, Any] = field(default_factory=dict)
    _by_qid: Optional[dict[int, tuple[str, int]]] = field(default=None, repr=False, compare=False)

    def split(self, name: str) -> list[VQARecord]:
        if name not in SPLITS:
            raise StageError(f"unknown split {name!r}; expected one of {SPLITS}")
        return self.train if name == "train" else self.val

    def record_by_question_id(self, question_id: int) -> VQARecord:
        """Look an item up by question_id in either split (question_ids are unique across splits)."""
        return self._locate(question_id)[2]

    def global_id(self, question_id: int) -> tuple[str, int]:
        """(split, index in that split's recorded order) of a question_id."""
        split, idx, _ = self._locate(question_id)
        return split, idx

    def _locate(self, question_id: int) -> tuple[str, int, VQARecord]:
        if self._by_qid is None:
            self._by_qid = {}
            for split in SPLITS:
                for i, rec in enumerate(self.split(split)):
                    self._by_qid[rec.question_id] = (split, i)
        try:
            split, idx = self._by_qid[int(question_id)]
        except KeyError:
            raise KeyError(f"question_id {question_id} is in neither split of dataset {self.name!r}") from None
        return split, idx, self.split(split)[idx]


# --------------------------------------------------------------------------- official files


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise StageError(f"{what}: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise StageError(f"{what}: {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _field(entry: Any, key: str, typ: type, path: Path, list_name: str, i: int) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise StageError(f"{path}: {list_name}[{i}] has no field {key!r}")
    value = entry[key]
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise StageError(f"{path}: {list_name}[{i}].{key} should be {typ.__name__}, got {type(value).__name__}")
    return value


def scan_images(folder: Path) -> dict[int, Path]:
    """image_id -> file, parsed from the trailing digits of COCO-style names.

    Scanning once (instead of formatting one expected name) accepts .jpg/.png and any prefix
    (``COCO_train2014_``, ``COCO_val2014_``, plain ids), and costs well under a second for COCO.
    """
    if not folder.is_dir():
        raise StageError(f"image folder not found: {folder}")
    found: dict[int, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        m = _IMAGE_ID_RE.search(entry.name)
        if m and entry.is_file():
            found.setdefault(int(m.group(1)), Path(entry.path))
    return found


def load_split(questions: Path, annotations: Path, images: Path, limit: Optional[int] = None) -> list[VQARecord]:
    """Read one split of the official format into records sorted by question_id.

    ``limit`` caps the split *after* ordering (the first N question_ids), so a capped run is a
    prefix of the full one. Every kept question must have an annotation and an image file.
    """
    questions, annotations, images = Path(questions), Path(annotations), Path(images)
    q_json = _read_json(questions, "questions")
    a_json = _read_json(annotations, "annotations")
    q_list = q_json.get("questions") if isinstance(q_json, dict) else None
    if not isinstance(q_list, list):
        raise StageError(f"{questions}: expected an object with a 'questions' list")
    a_list = a_json.get("annotations") if isinstance(a_json, dict) else None
    if not isinstance(a_list, list):
        raise StageError(f"{annotations}: expected an object with an 'annotations' list")

    answers_by_qid: dict[int, list[str]] = {}
    for i, ann in enumerate(a_list):
        qid = _field(ann, "question_id", int, annotations, "annotations", i)
        answers = _field(ann, "answers", list, annotations, "annotations", i)
        texts = []
        for j, a in enumerate(answers):
            texts.append(_field(a, "answer", str, annotations, f"annotations[{i}].answers", j))
        if not texts:
            raise StageError(f"{annotations}: annotations[{i}] (question_id {qid}) has no answers")
        answers_by_qid[qid] = texts

    rows: list[tuple[int, int, str]] = []
    seen: set[int] = set()
    for i, q in enumerate(q_list):
        qid = _field(q, "question_id", int, questions, "questions", i)
        image_id = _field(q, "image_id", int, questions, "questions", i)
        text = _field(q, "question", str, questions, "questions", i)
        if qid in seen:
            raise StageError(f"{questions}: questions[{i}]: duplicate question_id {qid}")
        seen.add(qid)
        rows.append((qid, image_id, text))
    rows.sort(key=lambda r: r[0])
    if limit is not None:
        rows = rows[:limit]

    missing = [qid for qid, _, _ in rows if qid not in answers_by_qid]
    if missing:
        raise StageError(
            f"{annotations}: no annotation for {len(missing)} question(s) of {questions.name}, "
            f"e.g. question_id {missing[:5]}"
        )
    image_files = scan_images(images)
    no_image = sorted({image_id for _, image_id, _ in rows if image_id not in image_files})
    if no_image:
        coco = re.fullmatch(r"(train|val|test)20\d\d", images.name)
        names = ", ".join(f"COCO_{images.name}_{i:012d}.jpg" if coco else f"*{i}.jpg" for i in no_image[:5])
        raise StageError(f"{images}: no image file for {len(no_image)} image_id(s), e.g. {no_image[:5]} "
                         f"(expected files like {names}; questions: {questions.name})")
    return [
        VQARecord(qid, image_id, text, list(answers_by_qid[qid]), image_files[image_id])
        for qid, image_id, text in rows
    ]


# --------------------------------------------------------------------------- dataset.json


def load_stage_index(ctx: Any, check_images: bool = True) -> DatasetIndex:
    """The prepare-data artifact a stage reads, images resolved against the plan's data root and
    (by default) checked up front, so a missing file is named before any model is loaded."""
    return load_index(ctx.input("prepare-data").path, check_images=check_images, data_root=ctx.plan.data.root)


#: ``dataset.json``'s ``image_base`` when record images are relative to the plan's ``data.root``
DATA_ROOT_BASE = "data.root"


def _relative(path: Path, base: Path) -> Optional[str]:
    """``path`` relative to ``base`` (as written, then with symlinks resolved), else None."""
    for p, b in ((path, base), (path.resolve(), base.resolve())):
        try:
            return p.relative_to(b).as_posix()
        except ValueError:
            continue
    return None


def _record_json(rec: VQARecord, base: Path, data_root: Optional[Path]) -> dict[str, Any]:
    path = rec.image_path
    image = _relative(path, base)
    if image is None and data_root is not None:
        image = _relative(path, data_root)
    if image is None:
        image = str(path.resolve())
    return {"question_id": rec.question_id, "image_id": rec.image_id, "question": rec.question,
            "answers": list(rec.answers), "image": image}


def write_index(out_dir: Path, index: DatasetIndex, data_root: Optional[Path] = None) -> Path:
    """Write ``dataset.json``.  Images inside ``out_dir`` are stored relative to it (synthetic);
    with ``data_root`` (official datasets) images under it are stored relative to it and the
    document says so (``image_base: data.root``): every other pod resolves them against its own
    mount of the data, wherever that is, instead of the path prepare-data happened to see."""
    out_dir = Path(out_dir)
    root = Path(data_root) if data_root is not None else None
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": index.name,
        "source": index.source,
        "splits": {s: [_record_json(r, out_dir, root) for r in index.split(s)] for s in SPLITS},
    }
    if root is not None:
        doc["image_base"] = DATA_ROOT_BASE
    path = out_dir / DATASET_FILE
    atomic_write_json(path, doc)
    return path


def load_index(directory: Path | str, check_images: bool = False, data_root: Optional[Path | str] = None) -> DatasetIndex:
    """Read a prepare-data artifact.  Relative image paths resolve against ``directory``, or,
    when the document's ``image_base`` is ``data.root``, against ``data_root`` (the plan's
    ``data.root`` as this process sees it).  ``check_images`` stats every image and names the
    missing ones (all of them counted, the first few listed) before any work starts."""
    directory = Path(directory)
    path = directory / DATASET_FILE
    doc = _read_json(path, "dataset index")
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        raise StageError(f"{path}: schema_version should be {SCHEMA_VERSION}, got {doc.get('schema_version') if isinstance(doc, dict) else doc!r}")
    base = directory
    if doc.get("image_base") == DATA_ROOT_BASE:
        if data_root is None:
            raise StageError(f"{path}: images are relative to data.root, but no data root was given")
        base = Path(data_root).expanduser()
        if not base.is_dir():
            raise StageError(f"data.root: dataset folder not found: {base} (images of {path} are relative to it; "
                             "is the data volume mounted?)")
    elif doc.get("image_base") is not None:
        raise StageError(f"{path}: unknown image_base {doc.get('image_base')!r}")
    missing: list[str] = []
    splits = doc.get("splits")
    if not isinstance(splits, dict):
        raise StageError(f"{path}: missing 'splits' object")
    parsed: dict[str, list[VQARecord]] = {}
    for split in SPLITS:
        recs = splits.get(split)
        if not isinstance(recs, list):
            raise StageError(f"{path}: splits.{split} should be a list")
        out: list[VQARecord] = []
        for i, r in enumerate(recs):
            where = f"splits.{split}"
            qid = _field(r, "question_id", int, path, where, i)
            image_id = _field(r, "image_id", int, path, where, i)
            question = _field(r, "question", str, path, where, i)
            answers = _field(r, "answers", list, path, where, i)
            if not answers or not all(isinstance(a, str) for a in answers):
                raise StageError(f"{path}: {where}[{i}].answers should be a non-empty list of strings")
            image = Path(_field(r, "image", str, path, where, i))
            image_path = image if image.is_absolute() else base / image
            if check_images and not image_path.is_file():
                missing.append(f"{where}[{i}] (question_id {qid}): {image_path}")
            if out and qid <= out[-1].question_id:
                raise StageError(f"{path}: {where}[{i}]: question_ids must be strictly increasing (recorded order)")
            out.append(VQARecord(qid, image_id, question, list(answers), image_path))
        parsed[split] = out
    if missing:
        raise StageError(f"{path}: {len(missing)} image file(s) not found, e.g. " + "; ".join(missing[:5]))
    return DatasetIndex(name=str(doc.get("name", "")), train=parsed["train"], val=parsed["val"],
                        source=dict(doc.get("source") or {}))
