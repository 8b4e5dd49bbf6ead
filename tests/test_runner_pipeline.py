"""The runner on the real graph shape with fake stage functions (see test_runner_fakes.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lever.config import load_plan
from lever.errors import StageError
from lever.pipeline.runner import Pipeline, load_baseline, run_plan, stage_closure
from lever.storage.store import LocalStore
from test_runner_fakes import fake_stages, read_log

SMALL = ["infer.num_samples=20", "infer.shards=2", "infer.shots=[1,2]", "report.bootstrap_samples=200"]


def _plans(name: str, extra: list[str] = ()):
    plan = load_plan(name, "tiny", SMALL + list(extra))
    return plan, load_baseline(plan, "tiny", SMALL + list(extra))


def test_full_run_then_everything_cached(tmp_path, fake_log):
    store = LocalStore(tmp_path / "store")
    plan, base = _plans("plan1")
    s1 = run_plan(plan, store, baseline=base, stages=fake_stages(), jobs=1)
    assert all(r.status == "built" for r in s1.results if r.plan == "plan1" and r.stage in ("train-grpo", "summarize"))
    calls1 = read_log(fake_log)
    assert ("baseline", "train-rce", "all") in calls1
    # plan1 shares RCE (and everything before it) with the baseline: built once, by the baseline
    assert sum(1 for c in calls1 if c[1] == "train-rce") == 1
    assert sum(1 for c in calls1 if c[1] == "generate-beams") == 2  # two shards
    # random/retrieval inference units are shared: only the baseline built them
    refs = [c for c in calls1 if c[1] == "infer" and c[2].startswith(("variantrandom", "variantretrieval"))]
    assert refs and {c[0] for c in refs} == {"baseline"}
    # plan1 evaluates GRPO epochs 1..3 (checkpoint.evaluate_epochs) beside its chosen checkpoint
    epochs = [c for c in calls1 if c[1] == "infer" and c[2].startswith("variantepoch")]
    assert {c[0] for c in epochs} == {"plan1"} and len(epochs) == 3 * 2 * 2  # epochs x shots x shards
    assert s1.report and Path(s1.report).is_file()
    rep = json.loads((Path(s1.report).parent / "report.json").read_text())
    assert rep["plan"] == "plan1" and rep["baseline_plan"] == "baseline" and not rep["partial"]

    s2 = run_plan(plan, store, baseline=base, stages=fake_stages(), jobs=1)
    assert {r.status for r in s2.results} == {"cached"}
    assert read_log(fake_log) == calls1
    assert s2.report == s1.report
    record = store.get_json("plans/plan1/latest.json")
    assert record["run_id"] == s2.run_id


def test_grpo_change_reruns_only_grpo_and_after(tmp_path, fake_log):
    store = LocalStore(tmp_path / "store")
    plan, base = _plans("plan1")
    run_plan(plan, store, baseline=base, stages=fake_stages(), jobs=1)
    n0 = len(read_log(fake_log))
    plan2, base2 = _plans("plan1", ["grpo.kl_beta=0.05"])
    assert base2.grpo.kl_beta == base.grpo.kl_beta, "a GRPO override must not change the baseline"
    s = run_plan(plan2, store, baseline=base2, stages=fake_stages(), jobs=1)
    rerun = Counter(c[1] for c in read_log(fake_log)[n0:])
    assert set(rerun) == {"train-grpo", "select-checkpoint", "convert", "infer"}, rerun  # summarize is the real one (unlogged)
    # (selector + GRPO epochs 1..3, which read train-grpo) x 2 shots x 2 shards; references reused
    assert rerun["infer"] == 4 * 2 * 2
    built = {(r.plan, r.stage) for r in s.results if r.status == "built"}
    assert built == {("plan1", n) for n in ("train-grpo", "select-checkpoint", "convert", "infer", "summarize")}


def test_corrupt_artifact_is_reported_and_rebuilt(tmp_path, fake_log, caplog):
    store = LocalStore(tmp_path / "store")
    plan, _ = _plans("baseline")
    run_plan(plan, store, stages=fake_stages(), jobs=1, only=["export-embeddings"])
    pipe = Pipeline(plan, LocalStore(tmp_path / "store"), stages=fake_stages())
    unit = pipe.select_units("export-embeddings")[0]
    f = tmp_path / "store" / pipe.key("export-embeddings", unit) / "out.json"
    f.write_text(f.read_text().replace("export", "EXPORT"))
    assert pipe.status("export-embeddings", unit) == "corrupt"
    n0 = len(read_log(fake_log))
    res = pipe.run_unit("export-embeddings", unit)
    assert res.status == "rebuilt"
    assert "failed verification" in caplog.text
    assert [c[1] for c in read_log(fake_log)[n0:]] == ["export-embeddings"]
    assert list((tmp_path / "store" / ".quarantine").iterdir())


def test_failed_unit_keeps_staging_and_others_commit(tmp_path, fake_log, monkeypatch):
    store = LocalStore(tmp_path / "store")
    plan, _ = _plans("baseline")
    monkeypatch.setenv("LEVER_FAKE_FAIL", "infer:variantrandom-shot2-shard1-of2")
    with pytest.raises(RuntimeError, match="1 unit"):
        run_plan(plan, store, stages=fake_stages(), jobs=1)
    pipe = Pipeline(plan, store, stages=fake_stages())
    statuses = {u.id: pipe.status("infer", u) for u in pipe.select_units("infer")}
    assert statuses.pop("variantrandom-shot2-shard1-of2") == "missing"
    assert set(statuses.values()) == {"cached"}, "siblings of the failed unit are committed"
    failed = [u for u in pipe.select_units("infer") if u.id == "variantrandom-shot2-shard1-of2"][0]
    staging = tmp_path / "store" / ".staging" / pipe.key("infer", failed)
    assert (staging / "predictions.jsonl").is_file(), "the killed unit's partial output survives for resume"
    monkeypatch.delenv("LEVER_FAKE_FAIL")
    s = run_plan(plan, store, stages=fake_stages(), jobs=1)
    assert [r.unit for r in s.results if r.status == "built" and r.stage == "infer"] == ["variantrandom-shot2-shard1-of2"]


def test_parallel_workers(tmp_path, fake_log):
    store = LocalStore(tmp_path / "store")
    plan, _ = _plans("baseline")
    s = run_plan(plan, store, stages=fake_stages(), jobs=2, only=["infer"])
    infer = [r for r in s.results if r.stage == "infer"]
    # (selector, random, retrieval, oracle) x shots x shards
    assert len(infer) == 4 * 2 * 2 and all(r.status == "built" for r in infer)
    assert len({c[2] for c in read_log(fake_log) if c[1] == "infer"}) == 16


def test_missing_input_is_a_stage_error(tmp_path, fake_log):
    plan, _ = _plans("baseline")
    pipe = Pipeline(plan, LocalStore(tmp_path / "store"), stages=fake_stages())
    with pytest.raises(StageError, match="not in the store"):
        pipe.run_unit("export-embeddings", pipe.select_units("export-embeddings")[0])


def test_unit_selection(tmp_path):
    plan, _ = _plans("baseline")
    pipe = Pipeline(plan, LocalStore(tmp_path / "store"), stages=fake_stages())
    assert [u.id for u in pipe.select_units("infer", filters={"shot": "2", "variant": "random"})] == [
        "variantrandom-shot2-shard0-of2", "variantrandom-shot2-shard1-of2"]
    assert len(pipe.select_units("generate-beams", unit_id="shard1-of2")) == 1
    with pytest.raises(StageError):
        pipe.select_units("infer", unit_id="nope")
    with pytest.raises(StageError):
        pipe.select_units("infer", filters={"colour": "red"})
    assert stage_closure(["train-rce"]) == ["prepare-data", "export-embeddings", "generate-beams", "train-v2",
                                            "generate-rl-data", "train-rce"]


def test_a_stage_version_bump_rebuilds_that_stage_and_after(tmp_path, fake_log):
    """A code change that alters a stage's output bumps ``Stage.version``: the old artifacts of
    that stage and of every stage reading it are no longer found, the ones upstream still are."""
    from dataclasses import replace

    from lever.pipeline.hashing import plan_keys

    store = LocalStore(tmp_path / "store")
    plan, base = _plans("plan1")
    stages = fake_stages()
    run_plan(plan, store, baseline=base, stages=stages, jobs=1)
    n0 = len(read_log(fake_log))
    bumped = tuple(replace(st, version=2) if st.name == "generate-rl-data" else st for st in stages)
    k1, k2 = plan_keys(plan, stages), plan_keys(plan, bumped)
    same = {n for n in k1.stage_hash if k1.stage_hash[n] == k2.stage_hash[n]}
    assert same == {"prepare-data", "export-embeddings", "generate-beams", "train-v2"}
    run_plan(plan, store, baseline=base, stages=bumped, jobs=1)
    rerun = {c[1] for c in read_log(fake_log)[n0:]}
    assert "generate-rl-data" in rerun and "train-rce" in rerun and "train-grpo" in rerun
    assert not rerun & {"prepare-data", "export-embeddings", "generate-beams", "train-v2"}


def test_units_carry_typed_parameters():
    """Stage code reads shard/of/variant/shot through typed properties, never by casting the raw
    parameter tuple; a unit without a parameter says which one is missing."""
    from lever.context import Unit

    u = Unit("infer", (("variant", "epoch2"), ("shot", 3), ("shard", 1), ("of", 2)))
    assert (u.variant, u.shot, u.shard, u.of) == ("epoch2", 3, 1, 2)
    whole = Unit("train-v2")
    assert (whole.shard, whole.of) == (0, 1)
    with pytest.raises(KeyError, match="train-v2/all has no shot"):
        whole.shot
