"""RL-data generation: record fields and invariants, sources, failures, resume byte identity."""

from __future__ import annotations

import json
import math

import pytest

from lever.data.dataset import load_index
from lever.metrics import vqa_accuracy
from lever.models.answer_scores import weighted_gt_prob
from lever.models.prompting import icd_example, most_common_answer, query_example
from lever.rl.data import read_rl_data
from lever.stages.sampling import BEAMS_FILE, RL_DATA_FILE, run_generate_beams, run_generate_rl_data

from lever_tiny_env import base_inputs, stage_ctx, tiny_data, tiny_lvlm, tiny_plan, upstream

N_Q = 4
COMMON = (f"beam.num_queries={N_Q}", "beam.shards=1", f"rl_data.num_queries={N_Q}", "rl_data.shards=1",
          "sampler.pool_size=8")


@pytest.fixture(scope="module")
def beams_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("beams")
    plan = tiny_plan(*COMMON)
    run_generate_beams(stage_ctx(plan, "generate-beams", d, base_inputs()), lvlm=tiny_lvlm())
    return d


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory):
    """A (randomly initialised) v2 pointer checkpoint, as train-v2 would write it."""
    from lever.models.embeddings import load_embeddings
    from lever.selectors.checkpoint import save_checkpoint
    from lever.selectors.pointer import build_selector

    d = tmp_path_factory.mktemp("v2")
    emb = load_embeddings(tiny_data() / "export-embeddings")
    save_checkpoint(d / "model", build_selector(emb.dim, tiny_plan().selector, seed=0), plan="test")
    return d


def _inputs(beams_dir, v2_dir=None):
    inp = dict(base_inputs())
    inp["generate-beams"] = upstream("generate-beams", beams_dir)
    if v2_dir is not None:
        inp["train-v2"] = upstream("train-v2", v2_dir)
    return inp


def _run(out, beams_dir, *overrides, v2_dir=None, lvlm=None, hook=None):
    plan = tiny_plan(*COMMON, *overrides)
    ctx = stage_ctx(plan, "generate-rl-data", out, _inputs(beams_dir, v2_dir))
    return run_generate_rl_data(ctx, lvlm=lvlm or tiny_lvlm(), hook=hook)


@pytest.fixture(scope="module")
def records(tmp_path_factory, beams_dir, v2_dir):
    out = tmp_path_factory.mktemp("rl")
    path = _run(out, beams_dir, v2_dir=v2_dir)
    return [json.loads(x) for x in path.read_text().splitlines()], path


def test_records_pass_the_reader_and_hold_the_invariants(records, beams_dir):
    recs, path = records
    plan = tiny_plan(*COMMON)
    assert [r["query_id"] for r in recs] == list(range(N_Q))
    assert len(read_rl_data([path])) == N_Q  # the RL trainer's validator accepts them
    beams = {json.loads(x)["query_id"]: json.loads(x) for x in (beams_dir / BEAMS_FILE).read_text().splitlines()}
    seen_sources: set[str] = set()
    index = load_index(tiny_data() / "prepare-data")
    for r in recs:
        q = index.train[r["query_id"]]
        assert r["query_id"] not in r["pool"]
        assert r["pool"] == beams[r["query_id"]]["pool"]  # the group's pool is the beams' pool
        assert r["gt_answers_raw"] == q.answers and r["question_id"] == q.question_id
        cands = r["candidates"]
        assert len(cands) >= plan.beam.beam_size
        seqs = [tuple(c["icd_ids"]) for c in cands]
        assert len(set(seqs)) == len(seqs), "duplicate sequences survived"
        for c in cands:
            assert len(c["icd_ids"]) == plan.rl_data.shots == len(set(c["icd_ids"]))
            assert [r["pool"][p] for p in c["positions"]] == c["icd_ids"]
            assert c["eval_failed"] is False
            assert c["acc_score"] == pytest.approx(vqa_accuracy(c["pred_answer"], r["gt_answers_raw"]))
            assert c["correct"] == (c["acc_score"] > 0)
            assert 0.0 < c["gt_prob"] < 1.0 and 0.0 <= c["rel_score"] <= 1.0
        sources = [c["source"] for c in cands]
        seen_sources.update(sources)
        # sources appear in their configured order (first source wins duplicates)
        order = ["infoscore_beam", "v2_beam", "v2_sample", "retrieval", "random"]
        assert [order.index(s) for s in sources] == sorted(order.index(s) for s in sources)
        ib = [c for c in cands if c["source"] == "infoscore_beam"]
        assert [c["beam_score"] for c in ib] == [b["score"] for b in beams[r["query_id"]]["beams"]][: len(ib)]
    # every source contributes somewhere (a query may lose one to deduplication: first source wins)
    assert seen_sources == {"infoscore_beam", "v2_beam", "v2_sample", "retrieval", "random"}


def test_info_score_and_gt_prob_match_separate_computations(records):
    recs, _ = records
    lvlm = tiny_lvlm()
    index = load_index(tiny_data() / "prepare-data")
    r = recs[1]
    q = index.train[r["query_id"]]
    y = most_common_answer(q.answers)
    p0 = math.exp(lvlm.answer_logprob([[query_example(q)]], [y])[0])
    for c in r["candidates"][:4]:
        prompt = [icd_example(index.train[g]) for g in c["icd_ids"]] + [query_example(q)]
        p = math.exp(lvlm.answer_logprob([prompt], [y])[0])
        assert c["info_score"] == pytest.approx(p - p0, abs=1e-5)
        per = {a: math.exp(lvlm.answer_logprob([prompt], [a])[0]) for a in {x for x in [most_common_answer([g]) for g in q.answers]}}
        assert c["gt_prob"] == pytest.approx(weighted_gt_prob(per, q.answers), abs=1e-5)
        assert c["raw_generation"] == lvlm.generate([prompt])[0]


def test_v2_sources_skip_cleanly_without_train_v2(tmp_path, beams_dir):
    recs = [json.loads(x) for x in _run(tmp_path, beams_dir).read_text().splitlines()]
    for r in recs:
        assert not {c["source"] for c in r["candidates"]} & {"v2_beam", "v2_sample"}
        assert len(r["candidates"]) >= 3


def test_balanced_adds_random_sequences_until_mixed(tmp_path, beams_dir):
    path = _run(tmp_path, beams_dir, "rl_data.balanced.enabled=true", "rl_data.balanced.max_extra_per_query=8",
                "rl_data.sources.retrieval.enabled=false")
    plain = _run(tmp_path / "plain", beams_dir, "rl_data.sources.retrieval.enabled=false")
    for rb, rp in zip((json.loads(x) for x in path.read_text().splitlines()),
                      (json.loads(x) for x in plain.read_text().splitlines())):
        ok = [c["correct"] for c in rp["candidates"]]
        extra = len(rb["candidates"]) - len(rp["candidates"])
        assert rb["candidates"][: len(rp["candidates"])] == rp["candidates"]
        if any(ok) and not all(ok):
            assert extra == 0
        else:
            assert 0 < extra <= 8
            okb = [c["correct"] for c in rb["candidates"]]
            assert extra == 8 or (any(okb) and not all(okb))


class FlakyLVLM:
    """Delegates to the tiny LVLM but fails on any prompt that shows ICD question ``bad``."""

    def __init__(self, inner, bad: str):
        self.inner, self.bad = inner, bad

    def _check(self, prompts):
        if any(ex.question == self.bad and ex.answer is not None for p in prompts for ex in p):
            raise RuntimeError("CUDA error: simulated")

    def answer_logprob(self, prompts, answers):
        self._check(prompts)
        return self.inner.answer_logprob(prompts, answers)

    def generate(self, prompts, max_new_tokens=None):
        self._check(prompts)
        return self.inner.generate(prompts, max_new_tokens)


def test_an_evaluation_failure_is_recorded_per_candidate(tmp_path, beams_dir):
    index = load_index(tiny_data() / "prepare-data")
    first = json.loads((beams_dir / BEAMS_FILE).read_text().splitlines()[0])
    bad_icd = first["beams"][0]["icd_ids"][0]
    flaky = FlakyLVLM(tiny_lvlm(), index.train[bad_icd].question)
    path = _run(tmp_path, beams_dir, "lvlm.fast=false", lvlm=flaky)
    r = json.loads(path.read_text().splitlines()[0])
    failed = [c for c in r["candidates"] if c["eval_failed"]]
    fine = [c for c in r["candidates"] if not c["eval_failed"]]
    assert failed and fine
    assert all("simulated" in c["error"] for c in failed)
    assert all(any(index.train[g].question == flaky.bad for g in c["icd_ids"]) for c in failed)
    assert all(not any(index.train[g].question == flaky.bad for g in c["icd_ids"]) for c in fine)


class Killed(RuntimeError):
    pass


def test_resume_after_kill_is_byte_identical(tmp_path, beams_dir, v2_dir, records):
    _, full_path = records
    out = tmp_path / "resumed"
    calls = []

    def kill_after_two(qid):
        calls.append(qid)
        if len(calls) == 2:
            raise Killed(qid)

    with pytest.raises(Killed):
        _run(out, beams_dir, v2_dir=v2_dir, hook=kill_after_two)
    path = out / RL_DATA_FILE
    assert len(path.read_text().splitlines()) == 2
    with open(path, "ab") as f:
        f.write(full_path.read_bytes().splitlines(keepends=True)[2][:57])  # torn write
    _run(out, beams_dir, v2_dir=v2_dir)
    assert path.read_bytes() == full_path.read_bytes()
