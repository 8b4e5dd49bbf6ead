"""Per-epoch evaluation (SPEC plan1: "GRPO 3 epochs, evaluate epochs 1, 2, 3"): the ``epoch{N}``
inference variants of ``checkpoint.evaluate_epochs`` in the one stage graph, their keys, and the
real ``infer`` stage loading ``grpo_epoch{N}`` from the train-grpo artifact."""

from __future__ import annotations

import json

import pytest

import lever.models.factory as factory_mod
import lever.selectors.checkpoint as ckpt_mod
from lever.config import load_plan
from lever.errors import StageError
from lever.inference.variants import epoch_of_variant, evaluated_epochs, infer_variants
from lever.pipeline.graph import BY_NAME
from lever.pipeline.hashing import plan_keys
from lever.pipeline.runner import Pipeline
from lever.storage.store import LocalStore
from test_infer_stage import ScriptedLVLM

SMALL = ["infer.num_samples=8", "infer.shards=1", "infer.shots=[1,2]", "lvlm.batch_size=4"]


def _infer_units(plan):
    return {(u.get("variant"), u.get("shot")): u for u in BY_NAME["infer"].units(plan)}


def test_plan1_evaluates_grpo_epochs_1_to_3_with_train_grpo_as_input():
    plan = load_plan("plan1", "tiny", SMALL)
    assert plan.checkpoint.evaluate_epochs == [1, 2, 3]
    assert infer_variants(plan) == ["selector", "epoch1", "epoch2", "epoch3", "random", "retrieval", "oracle"]
    st = BY_NAME["infer"]
    units = _infer_units(plan)
    for e in (1, 2, 3):
        for shot in (1, 2):
            assert st.inputs_for(units[(f"epoch{e}", shot)]) == ("prepare-data", "export-embeddings", "train-grpo")
    assert st.inputs_for(units[("selector", 1)]) == ("prepare-data", "export-embeddings", "convert")
    assert st.inputs_for(units[("random", 1)]) == ("prepare-data", "export-embeddings")
    for u in st.units(plan):  # every per-unit input is a declared stage input (the Argo DAG waits on it)
        assert set(st.inputs_for(u)) <= set(st.inputs)
    assert epoch_of_variant("epoch12") == 12 and epoch_of_variant("selector") is None
    assert epoch_of_variant("epoch0") is None
    # plans without evaluate_epochs (the baseline: RCE only) get no epoch units
    assert [v for v in infer_variants(load_plan("baseline", "tiny", SMALL)) if v.startswith("epoch")] == []


def test_epoch_unit_keys_follow_train_grpo_and_references_stay_shared():
    plan = load_plan("plan1", "tiny", SMALL)
    other = load_plan("plan1", "tiny", SMALL + ["grpo.kl_beta=0.05"])
    base = load_plan("baseline", "tiny", SMALL)
    k, k2, kb = plan_keys(plan), plan_keys(other), plan_keys(base)
    assert k.stage_hash["train-grpo"] != k2.stage_hash["train-grpo"]
    u = _infer_units(plan)
    for e in (1, 2, 3):
        # same variant/shot/shard, different GRPO run: a different artifact
        assert k.hash_of("infer", u[(f"epoch{e}", 1)]) != k2.hash_of("infer", u[(f"epoch{e}", 1)])
    assert len({k.hash_of("infer", u[(f"epoch{e}", 1)]) for e in (1, 2, 3)}) == 3
    ub = _infer_units(base)
    for ref in ("random", "retrieval", "oracle"):  # one artifact for every plan
        assert k.hash_of("infer", u[(ref, 2)]) == k2.hash_of("infer", u[(ref, 2)]) == kb.hash_of("infer", ub[(ref, 2)])
    # a change that leaves train-grpo alone (the checkpoint strategy) keeps the epoch units
    k3 = plan_keys(load_plan("plan1", "tiny", SMALL + ["checkpoint.strategy=val_loss"]))
    assert k3.hash_of("infer", u[("epoch2", 1)]) == k.hash_of("infer", u[("epoch2", 1)])
    assert k3.hash_of("infer", u[("selector", 1)]) != k.hash_of("infer", u[("selector", 1)])


def test_epochs_past_the_trained_count_are_not_units():
    short = load_plan("plan1", "tiny", SMALL + ["grpo.epochs=2"])
    assert evaluated_epochs(short) == [1, 2]
    assert "epoch3" not in infer_variants(short)
    assert evaluated_epochs(load_plan("plan1", "tiny", SMALL + ["grpo.epochs=0"])) == []
    with pytest.raises(Exception, match="evaluate_epochs"):
        load_plan("plan1", "tiny", SMALL + ["checkpoint.evaluate_epochs=[1,1]"])


def _grpo_store(tmp_path_factory, epochs, stopped=None):
    """prepare-data + export-embeddings really built; a train-grpo artifact holding real pointer
    checkpoints for ``epochs`` only, plus ``stopped.json`` when given."""
    from lever.models.embeddings import load_embeddings
    from lever.selectors.checkpoint import save_checkpoint
    from lever.selectors.pointer import build_selector

    store = LocalStore(tmp_path_factory.mktemp("epochs") / "store")
    plan = load_plan("plan1", "tiny", SMALL)
    pipe = Pipeline(plan, store)
    for name in ("prepare-data", "export-embeddings"):
        pipe.run_stage(name)
    emb = load_embeddings(store.open(pipe.key("export-embeddings", pipe.select_units("export-embeddings")[0])))
    dim = emb.train_query.shape[1]
    key = pipe.key("train-grpo", pipe.select_units("train-grpo")[0])
    with store.staging(key) as st:
        for e in epochs:
            save_checkpoint(st.path / f"grpo_epoch{e}", build_selector(dim, plan.selector, seed=e),
                            plan=plan.name, epoch=e, phase="grpo")
        (st.path / "metrics.jsonl").write_text("")
        if stopped is not None:
            (st.path / "stopped.json").write_text(json.dumps(stopped))
        store.commit(key, {"stage": "train-grpo"})
    return store, plan


@pytest.fixture(scope="module")
def store_with_grpo(tmp_path_factory):
    """Epochs 1 and 3 only (epoch 2 'lost', no guard stop)."""
    return _grpo_store(tmp_path_factory, (1, 3))


def _unit(pipe, variant, shot=1):
    return pipe.select_units("infer", filters={"variant": variant, "shot": str(shot)})[0]


def test_infer_loads_the_listed_grpo_epoch(store_with_grpo, monkeypatch):
    store, plan = store_with_grpo
    pipe = Pipeline(plan, store)
    loaded = []
    real = ckpt_mod.load_checkpoint
    monkeypatch.setattr(ckpt_mod, "load_checkpoint", lambda stem, **kw: loaded.append(stem.name) or real(stem, **kw))
    monkeypatch.setattr(factory_mod, "build_lvlm", lambda cfg: ScriptedLVLM())
    r = pipe.run_unit("infer", _unit(pipe, "epoch3", 2))
    assert r.status == "built" and loaded == ["grpo_epoch3"]
    rows = [json.loads(x) for x in (store.open(r.key) / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {x["variant"] for x in rows} == {"epoch3"} and all(len(x["icd_ids"]) == 2 for x in rows)


def test_missing_epoch_checkpoint_is_a_stage_error_naming_it(store_with_grpo, monkeypatch):
    store, plan = store_with_grpo
    pipe = Pipeline(plan, store)
    lvlm = ScriptedLVLM()
    monkeypatch.setattr(factory_mod, "build_lvlm", lambda cfg: lvlm)
    with pytest.raises(StageError, match=r"grpo_epoch2 missing .*epochs \[1, 3\]"):
        pipe.run_unit("infer", _unit(pipe, "epoch2"))
    assert lvlm.calls == 0 and pipe.status("infer", _unit(pipe, "epoch2")) == "missing"


@pytest.fixture(scope="module")
def store_with_stopped_grpo(tmp_path_factory):
    """The guard stopped training after epoch 1 (stopped.json), so it holds grpo_epoch1 only."""
    return _grpo_store(tmp_path_factory, (1,), {"phase": "grpo", "epoch": 1, "reason": "KL above 5: kl_exact=17"})


def test_an_epoch_the_guard_kept_from_training_is_recorded_not_failed(store_with_stopped_grpo, monkeypatch):
    """The divergence guard stopping GRPO before a listed epoch is an outcome: the epoch unit
    commits an empty predictions file and skipped.json with the reason, without LVLM work, and
    the report reader sees the cell as skipped.  A listed epoch missing *without* a stop stays a
    StageError (test above)."""
    from lever.report.predictions import collect

    store, plan = store_with_stopped_grpo
    pipe = Pipeline(plan, store)
    lvlm = ScriptedLVLM()
    monkeypatch.setattr(factory_mod, "build_lvlm", lambda cfg: lvlm)
    r = pipe.run_unit("infer", _unit(pipe, "epoch2"))
    assert r.status == "built" and lvlm.calls == 0
    d = store.open(r.key)
    assert (d / "predictions.jsonl").read_text() == ""
    why = json.loads((d / "skipped.json").read_text())["reason"]
    assert "stopped after grpo epoch 1" in why and "kl_exact=17" in why
    cell = collect([(_unit(pipe, "epoch2"), d)])[("epoch2", 1)]
    assert cell.skipped == why and cell.n == 0
    # the epoch that was trained is evaluated as usual
    r1 = pipe.run_unit("infer", _unit(pipe, "epoch1"))
    assert r1.status == "built" and not (store.open(r1.key) / "skipped.json").exists()
    assert len((store.open(r1.key) / "predictions.jsonl").read_text().splitlines()) == 8
