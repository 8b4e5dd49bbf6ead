"""Per-query resume of the sharded LVLM stages (real stages, tiny models).

A generate-rl-data shard killed after some queries (and with a torn last line, as a kill
mid-write leaves) and an infer unit killed mid-way are rerun on the same staging directory: the
rerun computes only the missing queries and the final file equals an uninterrupted run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lever.config import load_plan
from lever.context import StageContext
from lever.pipeline.runner import Pipeline
from lever.storage.store import LocalStore

SMALL = ["infer.num_samples=8", "report.bootstrap_samples=100", "beam.num_queries=5", "rl_data.num_queries=5",
         "infer.shots=[2]", "lvlm.warmup_steps=0", "beam.shards=1", "rl_data.shards=1", "infer.shards=1",
         "infer.baselines=[random]", "rl_data.sources.v2_sample.enabled=false", "rce.epochs=1"]


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    plan = load_plan("baseline", "tiny", SMALL)
    p = Pipeline(plan, LocalStore(root / "store"))
    for name in ("prepare-data", "export-embeddings", "generate-beams", "train-v2", "generate-rl-data", "train-rce", "train-grpo",
                 "select-checkpoint", "convert"):
        p.run_stage(name)
    return p


def _ctx(pipe: Pipeline, stage: str, out: Path, **unit) -> StageContext:
    st = pipe.stage(stage)
    u = next(x for x in pipe.select_units(stage) if all(x.get(k) == v for k, v in unit.items()))
    inputs = pipe._materialize(pipe.keys, st.inputs_for(u), False, "", [])
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(plan=pipe.plan, stage=stage, unit=u, inputs=inputs, out=out)


def test_rl_data_shard_resumes_per_query_byte_identical(pipe, tmp_path):
    from lever.stages.sampling import RL_DATA_FILE, run_generate_rl_data

    full = tmp_path / "full"
    run_generate_rl_data(_ctx(pipe, "generate-rl-data", full))
    want = (full / RL_DATA_FILE).read_bytes()
    assert len(want.splitlines()) == 5

    out = tmp_path / "killed"

    def kill_after_2(qid: int) -> None:
        if qid == 1:
            raise Killed

    with pytest.raises(Killed):
        run_generate_rl_data(_ctx(pipe, "generate-rl-data", out), hook=kill_after_2)
    partial = (out / RL_DATA_FILE).read_bytes()
    assert len(partial.splitlines()) == 2
    with open(out / RL_DATA_FILE, "ab") as f:  # the kill hit mid-write of query 2
        f.write(want.splitlines(keepends=True)[2][:57])
    seen: list[int] = []
    run_generate_rl_data(_ctx(pipe, "generate-rl-data", out), hook=seen.append)
    assert seen == [2, 3, 4], "the rerun recomputed finished queries"
    assert (out / RL_DATA_FILE).read_bytes() == want


def test_infer_unit_resumes_per_query(pipe, tmp_path, monkeypatch):
    import lever.models.factory as factory_mod
    from lever.stages.inference import PREDICTIONS, infer

    full = tmp_path / "full"
    infer(_ctx(pipe, "infer", full, variant="selector"))
    rows = (full / PREDICTIONS).read_text().splitlines()
    assert len(rows) == 8
    out = tmp_path / "killed"
    out.mkdir()
    (out / PREDICTIONS).write_text("\n".join(rows[:5]) + "\n" + rows[5][:40])  # 5 done, a torn 6th

    asked: list[int] = []
    real_build = factory_mod.build_lvlm

    def counting_build(cfg):
        m = real_build(cfg)
        gen = m.generate

        def generate(prompts, *a, **k):
            asked.append(len(prompts))
            return gen(prompts, *a, **k)
        m.generate = generate
        return m

    monkeypatch.setattr(factory_mod, "build_lvlm", counting_build)
    infer(_ctx(pipe, "infer", out, variant="selector"))
    assert sum(asked) == 3, f"the rerun generated for {sum(asked)} queries, not the 3 missing ones"
    got = {json.loads(r)["question_id"]: json.loads(r) for r in (out / PREDICTIONS).read_text().splitlines()}
    want = {json.loads(r)["question_id"]: json.loads(r) for r in rows}
    assert got == want
    assert json.loads((out / "summary.json").read_text())["accuracy"] == json.loads((full / "summary.json").read_text())["accuracy"]
