"""Synthetic OKVQA-format generation, the official-format loader and the prepare-data stage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lever.config import load_plan
from lever.data.dataset import load_index, load_split, write_index, DatasetIndex
from lever.stages.prepare_data import prepare_data
from lever.data.synthetic import SyntheticLayout, vocabulary, write_synthetic
from lever.metrics import normalize_answer, vqa_accuracy
from lever.errors import StageError
from lever.context import StageContext
from lever.context import Unit


def _digest_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> SyntheticLayout:
    return write_synthetic(tmp_path_factory.mktemp("synth"), n_train=30, n_val=9, image_size=40, seed=3)


def test_same_seed_gives_byte_identical_files(synth: SyntheticLayout, tmp_path: Path) -> None:
    again = write_synthetic(tmp_path / "again", n_train=30, n_val=9, image_size=40, seed=3)
    a, b = _digest_tree(synth.root), _digest_tree(again.root)
    assert a == b
    assert any(k.endswith(".png") for k in a) and len(a) > 4


def test_other_seed_differs(synth: SyntheticLayout, tmp_path: Path) -> None:
    other = write_synthetic(tmp_path / "other", n_train=30, n_val=9, image_size=40, seed=4)
    assert _digest_tree(synth.root) != _digest_tree(other.root)


def test_official_format_and_round_trip(synth: SyntheticLayout) -> None:
    q_doc = json.loads(synth.questions("train").read_text())
    a_doc = json.loads(synth.annotations("train").read_text())
    assert set(q_doc["questions"][0]) == {"image_id", "question", "question_id"}
    ann = a_doc["annotations"][0]
    assert len(ann["answers"]) == 10 and {"answer", "answer_id", "raw_answer"} <= set(ann["answers"][0])
    recs = load_split(synth.questions("train"), synth.annotations("train"), synth.images("train"))
    assert len(recs) == 30
    # recorded order: strictly increasing question_id, and same content as the JSON files
    assert [r.question_id for r in recs] == sorted(q["question_id"] for q in q_doc["questions"])
    by_qid = {q["question_id"]: q for q in q_doc["questions"]}
    ans_by_qid = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in a_doc["annotations"]}
    for r in recs:
        assert r.question == by_qid[r.question_id]["question"]
        assert r.image_id == by_qid[r.question_id]["image_id"]
        assert r.answers == ans_by_qid[r.question_id]
        assert r.image_path.name == f"COCO_train2014_{r.image_id:012d}.png" and r.image_path.is_file()


def test_images_have_configured_size_and_splits_are_disjoint(synth: SyntheticLayout) -> None:
    from PIL import Image

    train = load_split(synth.questions("train"), synth.annotations("train"), synth.images("train"))
    val = load_split(synth.questions("val"), synth.annotations("val"), synth.images("val"))
    assert len(val) == 9
    with Image.open(train[0].image_path) as im:
        assert im.size == (40, 40)
    assert not {r.image_id for r in train} & {r.image_id for r in val}
    assert not {r.question_id for r in train} & {r.question_id for r in val}


def test_answers_are_noisy_but_mostly_right(synth: SyntheticLayout) -> None:
    recs = load_split(synth.questions("train"), synth.annotations("train"), synth.images("train"))
    # the majority normalized answer scores well, and some records need normalization to agree
    accs, needs_norm = [], 0
    for r in recs:
        norm = [normalize_answer(a) for a in r.answers]
        top = max(set(norm), key=norm.count)
        accs.append(vqa_accuracy(top, r.answers))
        needs_norm += len(set(r.answers)) > len(set(norm))
    assert sum(accs) / len(accs) > 0.9
    assert needs_norm > 0


def test_vocabulary_covers_generated_questions(synth: SyntheticLayout) -> None:
    import re

    vocab = set(vocabulary())
    recs = load_split(synth.questions("train"), synth.annotations("train"), synth.images("train"))
    for r in recs:
        assert set(re.findall(r"\w+|[^\w\s]", r.question.lower())) <= vocab


def test_limit_takes_first_question_ids(synth: SyntheticLayout) -> None:
    full = load_split(synth.questions("train"), synth.annotations("train"), synth.images("train"))
    capped = load_split(synth.questions("train"), synth.annotations("train"), synth.images("train"), limit=7)
    assert capped == full[:7]


def test_missing_files_raise_clear_errors(synth: SyntheticLayout, tmp_path: Path) -> None:
    with pytest.raises(StageError, match="questions: file not found: .*nope.json"):
        load_split(tmp_path / "nope.json", synth.annotations("train"), synth.images("train"))
    with pytest.raises(StageError, match="image folder not found"):
        load_split(synth.questions("train"), synth.annotations("train"), tmp_path / "no_images")
    # an image that disappeared is named by its image_id
    import shutil

    few = tmp_path / "few_images"
    shutil.copytree(synth.images("train"), few)
    victim = sorted(few.iterdir())[3]
    victim.unlink()
    image_id = int(victim.stem.rsplit("_", 1)[1])
    with pytest.raises(StageError, match=rf"few_images: no image file for 1 image_id\(s\), e.g. \[{image_id}\]"):
        load_split(synth.questions("train"), synth.annotations("train"), few)


def test_malformed_json_names_file_and_field(synth: SyntheticLayout, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"questions": [\n{"image_id": 1, "question": "x"}]}')
    with pytest.raises(StageError, match=r"bad.json: questions\[0\] has no field 'question_id'"):
        load_split(bad, synth.annotations("train"), synth.images("train"))
    bad.write_text('{"questions": [\n{"image_id": 1,, }]}')
    with pytest.raises(StageError, match="invalid JSON at line 2"):
        load_split(bad, synth.annotations("train"), synth.images("train"))
    q = json.loads(synth.questions("train").read_text())
    q["questions"].append({"image_id": 1, "question": "extra?", "question_id": 10**9})
    bad.write_text(json.dumps(q))
    with pytest.raises(StageError, match=r"no annotation for 1 question.*1000000000"):
        load_split(bad, synth.annotations("train"), synth.images("train"))


def _ctx(plan, out: Path) -> StageContext:
    return StageContext(plan=plan, stage="prepare-data", unit=Unit("prepare-data"), inputs={}, out=out)


def test_prepare_data_synthetic_tiny_profile(tmp_path: Path) -> None:
    plan = load_plan("baseline", "tiny")
    prepare_data(_ctx(plan, tmp_path / "a"))
    index = load_index(tmp_path / "a", check_images=True)
    spec = plan.data.synthetic
    assert (len(index.train), len(index.val)) == (spec.n_train, spec.n_val)
    doc = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert doc["schema_version"] == 1 and doc["name"] == "synthetic"
    assert not Path(doc["splits"]["train"][0]["image"]).is_absolute()
    assert doc["splits"]["train"][0]["image"].startswith("images/")
    qids = [r.question_id for r in index.train]
    assert qids == sorted(qids)
    rec = index.train[5]
    assert index.record_by_question_id(rec.question_id) == rec
    assert index.global_id(index.val[2].question_id) == ("val", 2)
    # deterministic: a second run writes the same dataset.json
    prepare_data(_ctx(plan, tmp_path / "b"))
    assert (tmp_path / "a" / "dataset.json").read_bytes() == (tmp_path / "b" / "dataset.json").read_bytes()


def test_prepare_data_caps_after_ordering(tmp_path: Path) -> None:
    plan = load_plan("baseline", "tiny", ["data.max_train=10", "data.max_val=3"])
    prepare_data(_ctx(plan, tmp_path))
    index = load_index(tmp_path)
    full = load_split(SyntheticLayout(tmp_path).questions("train"), SyntheticLayout(tmp_path).annotations("train"),
                      SyntheticLayout(tmp_path).images("train"))
    assert len(index.train) == 10 and len(index.val) == 3
    assert [r.question_id for r in index.train] == [r.question_id for r in full[:10]]


def test_prepare_data_official_missing_root(tmp_path: Path) -> None:
    plan = load_plan("baseline", "tiny", ["data.dataset=okvqa", f"data.root={tmp_path / 'missing'}"])
    with pytest.raises(StageError, match="data.root"):
        prepare_data(_ctx(plan, tmp_path / "out"))


def test_prepare_data_official_layout(synth: SyntheticLayout, tmp_path: Path) -> None:
    """An OKVQA-style folder (root + official file names) indexes with image paths relative to
    data.root, which every reader resolves against its own mount of the data."""
    import shutil

    root = tmp_path / "okvqa"
    root.mkdir()
    shutil.copy(synth.questions("train"), root / "OpenEnded_mscoco_train2014_questions.json")
    shutil.copy(synth.annotations("train"), root / "mscoco_train2014_annotations.json")
    shutil.copy(synth.questions("val"), root / "OpenEnded_mscoco_val2014_questions.json")
    shutil.copy(synth.annotations("val"), root / "mscoco_val2014_annotations.json")
    shutil.copytree(synth.images("train"), root / "train2014")
    shutil.copytree(synth.images("val"), root / "val2014")
    plan = load_plan("baseline", "tiny", ["data.dataset=okvqa", f"data.root={root}"])
    prepare_data(_ctx(plan, tmp_path / "out"))
    doc = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert doc["name"] == "okvqa" and doc["image_base"] == "data.root"
    assert doc["splits"]["train"][0]["image"].startswith("train2014/")
    assert len(load_index(tmp_path / "out", check_images=True, data_root=root).train) == 30
    moved = tmp_path / "mounted-elsewhere"
    root.rename(moved)
    assert load_index(tmp_path / "out", check_images=True, data_root=moved).train[0].image_path.parent == moved / "train2014"


def test_load_index_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="dataset.json"):
        load_index(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"schema_version": 1, "name": "x", "splits": {
        "train": [{"question_id": 2, "image_id": 1, "question": "q", "answers": ["a"], "image": "i.png"},
                  {"question_id": 1, "image_id": 1, "question": "q", "answers": ["a"], "image": "i.png"}],
        "val": []}}))
    with pytest.raises(StageError, match=r"splits.train\[1\]: question_ids must be strictly increasing"):
        load_index(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"schema_version": 1, "name": "x", "splits": {
        "train": [{"question_id": "2", "image_id": 1, "question": "q", "answers": ["a"], "image": "i.png"}], "val": []}}))
    with pytest.raises(StageError, match=r"splits.train\[0\].question_id should be int"):
        load_index(tmp_path)


def test_write_index_round_trip(synth: SyntheticLayout, tmp_path: Path) -> None:
    train = load_split(synth.questions("train"), synth.annotations("train"), synth.images("train"))
    val = load_split(synth.questions("val"), synth.annotations("val"), synth.images("val"))
    write_index(tmp_path, DatasetIndex("x", train, val, {"k": 1}))
    back = load_index(tmp_path)
    assert back.train == train and back.val == val and back.source == {"k": 1}
