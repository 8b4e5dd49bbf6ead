"""The real ``infer`` stage on real tiny data/embeddings with a scripted LVLM: per-query resume
after a kill, failed generations marked and counted, VQA scoring of post-processed answers."""

from __future__ import annotations

import json

import pytest

import lever.models.factory as factory_mod
from lever.config import load_plan
from lever.pipeline.runner import Pipeline
from lever.storage.store import LocalStore


class Killed(BaseException):
    """Stands in for SIGKILL/preemption: not an Exception, so nothing catches it."""


class ScriptedLVLM:
    def __init__(self, kill_after_calls=None, fail_questions=()):
        self.calls = 0
        self.seen: list[str] = []
        self.kill_after = kill_after_calls
        self.fail = set(fail_questions)

    def generate(self, prompts, max_new_tokens=None):
        if self.kill_after is not None and self.calls >= self.kill_after:
            raise Killed()
        self.calls += 1
        for p in prompts:  # a bad item fails its whole batch, like a real batched call
            if str(p[-1].image) in self.fail:
                raise RuntimeError(f"cannot read image {p[-1].image}")
        out = []
        for p in prompts:
            self.seen.append(str(p[-1].image))
            out.append(" " + p[0].answer + "\nQuestion: ignored")  # copies the first ICD's answer
        return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    store = LocalStore(tmp_path_factory.mktemp("infer") / "store")
    plan = load_plan("baseline", "tiny", ["infer.num_samples=10", "infer.shards=1", "infer.shots=[2]",
                                          "lvlm.batch_size=4"])
    pipe = Pipeline(plan, store)
    for name in ("prepare-data", "export-embeddings"):
        pipe.run_stage(name)
    return store, plan


def _unit(pipe, variant):
    return pipe.select_units("infer", filters={"variant": variant})[0]


def test_resume_after_kill_and_failed_rows(base, monkeypatch):
    store, plan = base
    pipe = Pipeline(plan, store)
    unit = _unit(pipe, "random")
    first = ScriptedLVLM(kill_after_calls=1)
    monkeypatch.setattr(factory_mod, "build_lvlm", lambda cfg: first)
    with pytest.raises(Killed):
        pipe.run_unit("infer", unit)
    assert pipe.status("infer", unit) == "missing"
    assert len(first.seen) == 4  # one batch made it to disk
    from lever.data.dataset import load_index

    index = load_index(store.open(pipe.key("prepare-data", pipe.select_units("prepare-data")[0])))
    bad = str(index.val[6].image_path)
    second = ScriptedLVLM(fail_questions=[bad])
    monkeypatch.setattr(factory_mod, "build_lvlm", lambda cfg: second)
    r = pipe.run_unit("infer", unit)
    assert r.status == "built"
    assert sorted(second.seen) == sorted(str(q.image_path) for i, q in enumerate(index.val[4:10]) if i + 4 != 6)
    rows = [json.loads(line) for line in (store.open(r.key) / "predictions.jsonl").read_text().splitlines()]
    assert sorted(x["query_index"] for x in rows) == list(range(10))
    failed = [x for x in rows if x["eval_failed"]]
    assert [x["query_index"] for x in failed] == [6] and "cannot read image" in failed[0]["error"]
    from lever.metrics import vqa_accuracy

    ok = [x for x in rows if not x["eval_failed"]]
    for x in ok:
        assert "\n" not in x["answer"] and len(x["icd_ids"]) == 2
        assert x["accuracy"] == vqa_accuracy(x["answer"], index.val[x["query_index"]].answers)
    summary = json.loads((store.open(r.key) / "summary.json").read_text())
    assert summary["n"] == 9 and summary["n_failed"] == 1
    assert summary["accuracy"] == pytest.approx(sum(x["accuracy"] for x in ok) / 9)


def test_mostly_failing_lvlm_refuses_to_commit(base, monkeypatch):
    from lever.errors import StageError

    store, plan = base
    pipe = Pipeline(plan, store)
    unit = _unit(pipe, "retrieval")
    from lever.data.dataset import load_index

    index = load_index(store.open(pipe.key("prepare-data", pipe.select_units("prepare-data")[0])))
    monkeypatch.setattr(factory_mod, "build_lvlm", lambda cfg: ScriptedLVLM(fail_questions=[str(r.image_path) for r in index.val]))
    with pytest.raises(StageError, match="LVLM failed on 10/10"):
        pipe.run_unit("infer", unit)
    assert pipe.status("infer", unit) == "missing"


def test_too_many_shots_for_the_pool(base, monkeypatch):
    from lever.errors import StageError

    store, _ = base
    plan = load_plan("baseline", "tiny", ["infer.num_samples=10", "infer.shards=1", "infer.shots=[2]",
                                          "lvlm.batch_size=4", "infer.pool=retrieved", "infer.retrieve_top_n=2",
                                          "infer.shots=[2]"])
    pipe = Pipeline(plan, store)
    monkeypatch.setattr(factory_mod, "build_lvlm", lambda cfg: ScriptedLVLM())
    assert pipe.run_unit("infer", _unit(pipe, "random")).status == "built"  # 2 shots from a pool of 2: fine
    plan3 = load_plan("baseline", "tiny", ["infer.num_samples=10", "infer.shards=1", "infer.shots=[2]",
                                           "data.synthetic.n_train=4", "sampler.pool_size=2", "infer.shots=[5]"])
    pipe3 = Pipeline(plan3, store)
    for name in ("prepare-data", "export-embeddings"):
        pipe3.run_stage(name)
    with pytest.raises(StageError, match="shot 5 needs 5 distinct ICDs but the pool holds only 4"):
        pipe3.run_unit("infer", _unit(pipe3, "random"))
