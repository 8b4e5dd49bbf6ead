"""Candidate pool samplers and similarity retrieval: invariants and hand-checkable picks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lever.models.embeddings import Embeddings, query_embedding
from lever.errors import StageError
from lever.sampling.samplers import build_pool, query_rng, retrieve_similar

KINDS = ("random", "image_sim", "text_sim", "mix")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.fixture(scope="module")
def emb() -> Embeddings:
    g = torch.Generator().manual_seed(0)
    n_train, n_val, d = 40, 6, 8
    ti, tt = _unit(torch.randn(n_train, d, generator=g)), _unit(torch.randn(n_train, d, generator=g))
    vi, vt = _unit(torch.randn(n_val, d, generator=g)), _unit(torch.randn(n_val, d, generator=g))
    return Embeddings(ti, tt, query_embedding(ti, tt), vi, vt, query_embedding(vi, vt),
                      order={"train": list(range(100, 100 + n_train)), "val": list(range(900, 900 + n_val))})


def _cos_rank(q: torch.Tensor, table: torch.Tensor) -> list[int]:
    sims = [(float(table[i] @ q), i) for i in range(table.shape[0])]
    return [i for _, i in sorted(sims, key=lambda t: (-t[0], t[1]))]


@pytest.mark.parametrize("kind", KINDS)
def test_pool_invariants(emb: Embeddings, kind: str) -> None:
    for q in range(emb.train_query.shape[0]):
        pool = build_pool(kind, q, emb, 12, 7, 0.5)
        assert len(pool) == 12
        assert len(set(pool)) == 12, "duplicates in pool"
        assert q not in pool, "query in its own pool"
        assert all(0 <= i < 40 for i in pool)


@pytest.mark.parametrize("kind", KINDS)
def test_pool_is_deterministic_per_query(emb: Embeddings, kind: str) -> None:
    a = [build_pool(kind, q, emb, 10, 3) for q in range(40)]
    # computing queries in another order (as a different shard layout would) changes nothing
    b = {q: build_pool(kind, q, emb, 10, 3) for q in reversed(range(40))}
    assert a == [b[q] for q in range(40)]


def test_random_pool_depends_on_seed_and_query(emb: Embeddings) -> None:
    assert build_pool("random", 0, emb, 10, 1) != build_pool("random", 0, emb, 10, 2)
    assert build_pool("random", 0, emb, 10, 1) != build_pool("random", 1, emb, 10, 1)
    # an explicit generator is used as given
    assert build_pool("random", 0, emb, 10, query_rng(1, 0)) == build_pool("random", 0, emb, 10, 1)


def test_random_pool_covers_train_roughly_uniformly(emb: Embeddings) -> None:
    counts = np.zeros(40)
    for seed in range(200):
        for i in build_pool("random", 5, emb, 13, seed):
            counts[i] += 1
    assert counts[5] == 0
    others = np.delete(counts, 5)
    # expected 200*13/39 = 66.7 per id
    assert others.min() > 35 and others.max() < 100


def test_image_sim_picks_most_similar(emb: Embeddings) -> None:
    q = 3
    expected = [i for i in _cos_rank(emb.train_image[q], emb.train_image) if i != q][:8]
    assert build_pool("image_sim", q, emb, 8, 0) == expected
    expected_t = [i for i in _cos_rank(emb.train_text[q], emb.train_text) if i != q][:8]
    assert build_pool("text_sim", q, emb, 8, 0) == expected_t
    assert expected != expected_t


def test_image_sim_with_planted_neighbour() -> None:
    d = 4
    base = torch.eye(d)
    train_image = _unit(torch.stack([base[0], base[1], base[2], base[0] * 0.9 + base[1] * 0.1, base[3]]))
    text = _unit(torch.ones(5, d))
    e = Embeddings(train_image, text, query_embedding(train_image, text), train_image[:1], text[:1],
                   query_embedding(train_image[:1], text[:1]), order={"train": [1, 2, 3, 4, 5], "val": [9]})
    # item 3 points almost like item 0, so it is 0's nearest neighbour; 0 is excluded from its own pool
    assert build_pool("image_sim", 0, e, 2, 0) == [3, 1]
    # for a val query, the train twin (id 0) is allowed
    assert build_pool("image_sim", 0, e, 2, 0, query_split="val") == [0, 3]


def test_mix_splits_by_fraction_without_duplicates(emb: Embeddings) -> None:
    q, K = 11, 10
    pool = build_pool("mix", q, emb, K, 0, mix_image_fraction=0.3)
    img_top = [i for i in _cos_rank(emb.train_image[q], emb.train_image) if i != q][:3]
    assert pool[:3] == img_top
    text_rank = [i for i in _cos_rank(emb.train_text[q], emb.train_text) if i != q and i not in img_top]
    assert pool[3:] == text_rank[:7]
    assert len(set(pool)) == K and q not in pool
    assert build_pool("mix", q, emb, K, 0, mix_image_fraction=1.0) == build_pool("image_sim", q, emb, K, 0)
    assert build_pool("mix", q, emb, K, 0, mix_image_fraction=0.0) == build_pool("text_sim", q, emb, K, 0)


def test_pool_too_large_is_a_clear_error(emb: Embeddings) -> None:
    assert len(build_pool("random", 0, emb, 39, 0)) == 39  # train 40 minus the query
    with pytest.raises(StageError, match=r"sampler.pool_size=40 is larger than the 39 train items"):
        build_pool("random", 0, emb, 40, 0)
    with pytest.raises(StageError, match="unknown sampler"):
        build_pool("nearest", 0, emb, 4, 0)


def test_exclude_is_respected(emb: Embeddings) -> None:
    pool = build_pool("image_sim", 2, emb, 10, 0, exclude=[5, 6, 7])
    assert not {2, 5, 6, 7} & set(pool)


def test_retrieve_similar_orders_and_excludes() -> None:
    cands = _unit(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.2], [-1.0, 0.0]]))
    q = torch.tensor([1.0, 0.1])
    # cosines with [1, .1]: id0 .995, id1 .0995, id2 .774, id3 .9987, id4 -.995
    assert retrieve_similar(q, cands, 5) == [3, 0, 2, 1, 4]
    assert retrieve_similar(q, cands, 2, exclude=[3]) == [0, 2]
    with pytest.raises(StageError, match="asked for 5 candidates but only 4"):
        retrieve_similar(q, cands, 5, exclude=[0])


def test_retrieve_similar_ties_break_to_lower_id() -> None:
    cands = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert retrieve_similar(torch.tensor([1.0, 0.0]), cands, 3) == [1, 2, 3]


def test_query_rng_is_stable() -> None:
    a = query_rng(42, 7).integers(0, 1 << 30, size=4)
    b = query_rng(42, 7).integers(0, 1 << 30, size=4)
    c = query_rng(42, 8).integers(0, 1 << 30, size=4)
    assert (a == b).all() and not (a == c).all()


def test_pool_from_plan_config(emb: Embeddings) -> None:
    from lever.config import load_plan
    from lever.sampling.samplers import build_pool_from_config

    cfg = load_plan("baseline", "tiny", ["sampler.kind=mix", "sampler.pool_size=6", "sampler.mix_image_fraction=0.5"]).sampler
    assert build_pool_from_config(cfg, 4, emb, 9) == build_pool("mix", 4, emb, 6, 9, 0.5)
