"""InfoScore beam search: the score definition, global top-B, invariants, stage output, resume."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from lever.data.dataset import load_index
from lever.models.prompting import icd_example, most_common_answer, query_example
from lever.errors import StageError
from lever.sampling.beam_search import check_beam_record, infoscore_beam_search, plain_scorer
from lever.sampling.shards import shard_range
from lever.stages.sampling import BEAMS_FILE, run_generate_beams

from lever_tiny_env import base_inputs, stage_ctx, tiny_data, tiny_lvlm, tiny_plan


@pytest.fixture(scope="module")
def lvlm():
    return tiny_lvlm()


@pytest.fixture(scope="module")
def index():
    return load_index(tiny_data() / "prepare-data")


def _p(lvlm, prompt, y):
    return math.exp(lvlm.answer_logprob([prompt], [y])[0])


def test_scores_are_differences_of_separately_computed_probabilities(lvlm, index):
    q = index.train[5]
    pool = [icd_example(index.train[g]) for g in (0, 1, 2, 3, 4, 6)]
    y = most_common_answer(q.answers)
    beams, p0 = infoscore_beam_search(plain_scorer(lvlm), query_example(q), y, pool, beam_size=3, shots=2)
    assert p0 == pytest.approx(_p(lvlm, [query_example(q)], y), abs=1e-6)
    for b in beams:
        seq = [pool[i] for i in b.positions]
        p_full = _p(lvlm, seq + [query_example(q)], y)
        p_first = _p(lvlm, seq[:1] + [query_example(q)], y)
        # sum of the two steps' gains: (P(y|c1,x) - P(y|x)) + (P(y|c1,c2,x) - P(y|c1,x))
        assert b.score == pytest.approx((p_first - p0) + (p_full - p_first), abs=1e-5)
        assert b.prob == pytest.approx(p_full, abs=1e-5)


def test_exhaustive_beam_equals_brute_force_ranking(lvlm, index):
    """With B >= K*(K-1) the search keeps every ordered pair; its ranking must equal the brute force."""
    q = index.train[7]
    pool = [icd_example(index.train[g]) for g in (10, 11, 12, 13)]
    y = most_common_answer(q.answers)
    beams, p0 = infoscore_beam_search(plain_scorer(lvlm), query_example(q), y, pool, beam_size=100, shots=2)
    brute = {}
    for a, b in itertools.permutations(range(4), 2):
        brute[(a, b)] = _p(lvlm, [pool[a], pool[b], query_example(q)], y) - p0
    assert len(beams) == 12
    assert {b.positions for b in beams} == set(brute)
    for b in beams:
        assert b.score == pytest.approx(brute[b.positions], abs=1e-5)
    best = max(brute, key=brute.get)
    assert beams[0].score == pytest.approx(brute[best], abs=1e-6)
    # a narrow beam keeps the global top-B of each step
    narrow, _ = infoscore_beam_search(plain_scorer(lvlm), query_example(q), y, pool, beam_size=2, shots=1)
    singles = sorted(range(4), key=lambda c: -_p(lvlm, [pool[c], query_example(q)], y))
    assert [b.positions for b in narrow] == [(singles[0],), (singles[1],)]


def test_refuses_more_shots_than_the_pool(lvlm, index):
    q = index.train[0]
    with pytest.raises(ValueError):
        infoscore_beam_search(plain_scorer(lvlm), query_example(q), "red", [icd_example(index.train[1])], 2, 2)


def test_shard_ranges_partition_the_queries():
    for n, of in [(32, 2), (7, 3), (2, 4)]:
        got = [i for s in range(of) for i in shard_range(n, s, of)]
        assert got == list(range(n))


PLAN_OVERRIDES = ("beam.num_queries=6", "beam.shards=2", "sampler.pool_size=6")


def _run(tmp, shard=0, of=2, hook=None):
    plan = tiny_plan(*PLAN_OVERRIDES)
    ctx = stage_ctx(plan, "generate-beams", tmp, base_inputs(), shard, of)
    return run_generate_beams(ctx, lvlm=tiny_lvlm(), hook=hook)


def test_stage_output_invariants(tmp_path):
    plan = tiny_plan(*PLAN_OVERRIDES)
    lines = []
    for shard in range(2):
        path = _run(tmp_path / f"s{shard}", shard)
        lines += [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["query_id"] for r in lines] == list(range(6))
    for rec in lines:
        assert len(rec["pool"]) == 6
        assert check_beam_record(rec, plan.beam.beam_size, plan.beam.shots) is None
        assert len(rec["beams"]) == plan.beam.beam_size


class Killed(RuntimeError):
    pass


def test_resume_after_kill_is_byte_identical(tmp_path):
    full = _run(tmp_path / "full", shard=1).read_bytes()

    def kill_after_first(qid):
        raise Killed(qid)

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        _run(out, shard=1, hook=kill_after_first)
    path = out / BEAMS_FILE
    assert len(path.read_text().splitlines()) == 1
    with open(path, "ab") as f:  # the process died in the middle of writing the next line
        f.write(b'{"query_id": 4, "question_id": 12')
    _run(out, shard=1)
    assert path.read_bytes() == full


def test_resume_refuses_a_foreign_partial_file(tmp_path):
    out = tmp_path / "foreign"
    out.mkdir()
    (out / BEAMS_FILE).write_text('{"query_id": 99}\n')
    with pytest.raises(StageError, match="query_id"):
        _run(out, shard=1)
