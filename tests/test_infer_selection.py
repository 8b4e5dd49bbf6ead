"""ICD choice per inference variant, pool checks and per-query resume (no LVLM needed)."""

from __future__ import annotations

import json

import pytest
import torch

from lever.config import load_plan
from lever.config.schema import SelectorConfig
from lever.inference.selection import check_pool, choose_random, choose_retrieval, choose_selector, pools_for
from lever.stages.inference import read_done, shard_range
from lever.errors import StageError


def test_pool_too_small_is_an_error_not_a_silent_truncation():
    assert check_pool(4, 10, "train", 64, False, "x") == 10
    assert check_pool(2, 3, "train", 64, True, "x") == 2
    with pytest.raises(StageError, match="shot 3 needs 3 distinct ICDs but the pool holds only 2"):
        check_pool(3, 3, "train", 64, True, "x")
    with pytest.raises(StageError, match="retrieve_top_n=64 exceeds"):
        check_pool(2, 10, "retrieved", 64, False, "x")
    with pytest.raises(StageError, match="pool holds only 2"):
        check_pool(3, 10, "retrieved", 2, False, "x")


def test_config_rejects_retrieved_pool_smaller_than_shots():
    from lever.config import PlanError

    with pytest.raises(PlanError, match="retrieve_top_n"):
        load_plan("baseline", "tiny", ["infer.pool=retrieved", "infer.retrieve_top_n=2"])


def test_random_is_seeded_per_query_and_distinct():
    pool = list(range(50))
    a = choose_random(pool, 4, seed=7, query_index=3)
    assert a == choose_random(pool, 4, seed=7, query_index=3)
    assert len(set(a)) == 4
    assert a != choose_random(pool, 4, seed=7, query_index=4) or a != choose_random(pool, 4, seed=8, query_index=3)


def test_retrieval_puts_most_similar_last():
    train = torch.eye(5)
    q = torch.tensor([0.0, 0.1, 0.0, 0.9, 0.5])
    assert choose_retrieval(q, train, list(range(5)), 3) == [1, 4, 3]
    assert choose_retrieval(q, train, [0, 1, 2], 2) == [2, 1] or choose_retrieval(q, train, [0, 1, 2], 2) == [0, 1]


def test_pools_exclude_self_and_retrieve_top_n():
    train = torch.randn(20, 8)
    pools = pools_for(train[:2], train, "train", 5, [0, None])
    assert 0 not in pools[0] and len(pools[0]) == 19 and len(pools[1]) == 20
    top = pools_for(train[:2], train, "retrieved", 5, [0, 1])
    assert all(len(p) == 5 for p in top) and 0 not in top[0] and 1 not in top[1]


def test_selector_respects_pools_and_never_repeats():
    from lever.selectors.pointer import PointerSelector

    torch.manual_seed(0)
    model = PointerSelector(8, SelectorConfig(hidden=16, dropout=0.0))
    cands = torch.randn(30, 8)
    pools = [list(range(0, 10)), list(range(10, 14))]
    out = choose_selector(model, torch.randn(2, 8), cands, pools, 4)
    assert all(len(set(seq)) == 4 for seq in out)
    assert set(out[0]) <= set(pools[0]) and set(out[1]) == set(pools[1])


def test_shards_are_contiguous_and_cover():
    ranges = [shard_range(25, i, 4) for i in range(4)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 25
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_resume_drops_torn_line_and_failed_rows(tmp_path):
    p = tmp_path / "predictions.jsonl"
    rows = [{"query_index": 0, "accuracy": 1.0}, {"query_index": 1, "eval_failed": True, "accuracy": 0.0},
            {"query_index": 2, "accuracy": 0.3}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"query_index": 3, "acc')
    done = read_done(p)
    assert sorted(done) == [0, 2]
    assert [json.loads(line)["query_index"] for line in p.read_text().splitlines()] == [0, 2]
