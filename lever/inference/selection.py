"""How each inference variant picks the ICDs of a query (global train ids, prompt order).

* ``selector`` / ``v2``: the pointer selector's greedy sequence over the pool, in the order chosen.
* ``random``: ``shot`` distinct pool members from a generator seeded by (infer.seed, query index),
  so a query gets the same ICDs whatever the shard layout.
* ``retrieval``: the ``shot`` most CLIP-image-similar pool members, the most similar placed last,
  i.e. nearest the query.
* ``oracle`` (synthetic data only): pool members of the query's question type whose deciding value
  (the colour of a planted question, the answer of an ordinary one) is the query's first, then
  those with that value, then the rest, each tier by image similarity; the best placed last.  It
  uses knowledge no selector has (the generator's labels), so its row is the upper reference a
  learned selector is measured against.

The pool is the whole train split or, with ``infer.pool: retrieved``, each query's top-N train
items by CLIP image similarity.  A request for more shots than the pool holds is a StageError:
the reference code silently showed 2 ICDs for shots 3 and 4, which made its shot curves lie.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from lever.errors import StageError


def check_pool(shot: int, n_train: int, pool: str, top_n: int, exclude_self: bool, where: str) -> int:
    """Size of every query's pool; StageError if it cannot give ``shot`` distinct ICDs."""
    available = n_train - (1 if exclude_self else 0)
    if pool == "retrieved":
        if top_n > available:
            raise StageError(f"{where}: infer.retrieve_top_n={top_n} exceeds the {available} train items available")
        available = top_n
    if shot > available:
        raise StageError(
            f"{where}: shot {shot} needs {shot} distinct ICDs but the pool holds only {available} "
            f"(infer.pool={pool}, train items={n_train}); lower infer.shots or enlarge the pool")
    return available


def similarity(query: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """Cosine similarities [B, N] of query rows [B, d] to candidate rows [N, d]."""
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    c = torch.nn.functional.normalize(cands.float(), dim=-1)
    return q @ c.T


def pools_for(query_img: torch.Tensor, train_img: torch.Tensor, pool: str, top_n: int,
              self_ids: Sequence[Optional[int]]) -> list[list[int]]:
    """Candidate pool (global train ids) per query: all train items, or the top-N by image
    similarity (most similar first); a query that is itself a train item never sees itself."""
    n = train_img.shape[0]
    if pool == "train":
        return [[i for i in range(n) if i != s] for s in self_ids]
    sims = similarity(query_img, train_img)
    for row, s in enumerate(self_ids):
        if s is not None:
            sims[row, s] = float("-inf")
    order = torch.argsort(-sims, dim=1, stable=True)[:, :top_n]
    return order.tolist()


def choose_random(pool: list[int], shot: int, seed: int, query_index: int) -> list[int]:
    from lever.sampling.samplers import query_rng

    gen = query_rng(seed, query_index)
    picks = gen.choice(len(pool), size=shot, replace=False)
    return [pool[int(i)] for i in picks]


def choose_retrieval(query_img: torch.Tensor, train_img: torch.Tensor, pool: list[int], shot: int) -> list[int]:
    sims = similarity(query_img.reshape(1, -1), train_img[pool]).reshape(-1)
    top = torch.argsort(-sims, stable=True)[:shot].tolist()
    return [pool[i] for i in reversed(top)]  # most similar last: nearest the query


def choose_oracle(query_label: tuple[str, str], train_labels: Sequence[tuple[str, str]], query_img: torch.Tensor,
                  train_img: torch.Tensor, pool: list[int], shot: int) -> list[int]:
    """``shot`` pool members ranked by (same question type and planted value, same planted value,
    image similarity), most relevant placed last (nearest the query, as retrieval does)."""
    qtype, value = query_label
    sims = similarity(query_img.reshape(1, -1), train_img[pool]).reshape(-1).tolist()

    def rank(j: int) -> tuple[int, float]:
        t, v = train_labels[pool[j]]
        tier = 0 if (t == qtype and v == value) else 1 if v == value else 2
        return tier, -sims[j]

    top = sorted(range(len(pool)), key=rank)[:shot]
    return [pool[i] for i in reversed(top)]


def choose_selector(model: torch.nn.Module, query_emb: torch.Tensor, cand_emb: torch.Tensor,
                    pools: list[list[int]], shot: int) -> list[list[int]]:
    """Greedy pointer sequences for a batch of queries over their pools (padded + masked)."""
    from lever.selectors.pointer import greedy

    k = max(len(p) for p in pools)
    b = len(pools)
    idx = torch.zeros(b, k, dtype=torch.long)
    mask = torch.zeros(b, k, dtype=torch.bool)
    for r, p in enumerate(pools):
        idx[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        mask[r, : len(p)] = True
    cands = cand_emb[idx]  # [B, K, d]
    with torch.no_grad():
        pos = greedy(model, query_emb.float(), cands.float(), shot, cand_mask=mask)
    return [[pools[r][int(j)] for j in pos[r].tolist()] for r in range(b)]
