"""Candidate pools (K ICDs per query) and similarity retrieval over the train split.

Every random choice is drawn from an RNG derived from (seed, query id) alone, so a query's pool is
the same whether it is computed in one process or in shard 3 of 8, and resuming a killed shard
reproduces it exactly. Similarity ties break towards the lower global id for the same reason.

Pool order: similarity pools are most-similar first; ``mix`` lists its image-similarity part,
then its text-similarity part, then any random fill; ``random`` keeps the drawn order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Literal, Union

import numpy as np
import torch

from lever.models.embeddings import Embeddings
from lever.errors import StageError

if TYPE_CHECKING:
    from lever.config.schema import SamplerConfig

SamplerKind = Literal["random", "image_sim", "text_sim", "mix"]
SAMPLER_KINDS: tuple[str, ...] = ("random", "image_sim", "text_sim", "mix")


def query_rng(seed: int, query_id: int) -> np.random.Generator:
    """A generator that depends only on (seed, query_id): independent of shard layout and order."""
    if seed < 0 or query_id < 0:
        raise ValueError(f"query_rng needs non-negative seed and query_id, got {seed}, {query_id}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(query_id)])))


def similarity_ranking(query_emb: torch.Tensor, cand_embs: torch.Tensor) -> list[int]:
    """All candidate ids by cosine similarity to ``query_emb``, most similar first, ties -> lower id."""
    q = torch.nn.functional.normalize(query_emb.float().reshape(1, -1), dim=-1)
    c = torch.nn.functional.normalize(cand_embs.float(), dim=-1)
    sims = (c @ q.T).reshape(-1)
    return torch.argsort(-sims, stable=True).tolist()


def retrieve_similar(query_emb: torch.Tensor, cand_embs: torch.Tensor, n: int, exclude: Iterable[int] = ()) -> list[int]:
    """The ``n`` candidates most cosine-similar to ``query_emb`` (most similar first), skipping ``exclude``.

    Used by the retrieval sources and baselines (CLIP image or query similarity).
    """
    if cand_embs.ndim != 2 or query_emb.reshape(-1).shape[0] != cand_embs.shape[1]:
        raise StageError(f"retrieve_similar: query dim {tuple(query_emb.shape)} does not match candidates {tuple(cand_embs.shape)}")
    banned = set(int(i) for i in exclude)
    available = cand_embs.shape[0] - len(banned & set(range(cand_embs.shape[0])))
    if n > available:
        raise StageError(f"retrieve_similar: asked for {n} candidates but only {available} are available after exclusions")
    out: list[int] = []
    for i in similarity_ranking(query_emb, cand_embs):
        if i not in banned:
            out.append(i)
            if len(out) == n:
                break
    return out


def _query_row(embeddings: Embeddings, split: str, kind: str, query_idx: int) -> torch.Tensor:
    table = embeddings.get(split, kind)
    if not 0 <= query_idx < table.shape[0]:
        raise StageError(f"sampler: query index {query_idx} is outside the {split} split (size {table.shape[0]})")
    return table[query_idx]


def build_pool(
    kind: str,
    query_idx: int,
    embeddings: Embeddings,
    K: int,
    rng: Union[np.random.Generator, int] = 0,
    mix_image_fraction: float = 0.5,
    *,
    query_split: str = "train",
    exclude: Iterable[int] = (),
) -> list[int]:
    """K distinct global train ids as the candidate pool of one query.

    ``query_idx`` is the query's index in ``query_split`` (a global train id by default, in which
    case the query itself is never in its pool). ``rng`` is a Generator or a seed; a seed is turned
    into ``query_rng(seed, query_idx)``. ``exclude`` lists further train ids to keep out.
    """
    if kind not in SAMPLER_KINDS:
        raise StageError(f"sampler.kind: unknown sampler {kind!r}; expected one of {SAMPLER_KINDS}")
    if not 0.0 <= mix_image_fraction <= 1.0:
        raise StageError(f"sampler.mix_image_fraction must be in [0, 1], got {mix_image_fraction}")
    n_train = embeddings.train_query.shape[0]
    banned = {int(i) for i in exclude if 0 <= int(i) < n_train}
    if query_split == "train":
        banned.add(int(query_idx))
    available = n_train - len(banned)
    if K < 1:
        raise StageError(f"sampler.pool_size must be >= 1, got {K}")
    if K > available:
        raise StageError(
            f"sampler.pool_size={K} is larger than the {available} train items available to query "
            f"{query_idx} (train split has {n_train}; the query itself is excluded). "
            "Lower sampler.pool_size or raise data.max_train / data.synthetic.n_train."
        )
    gen = rng if isinstance(rng, np.random.Generator) else query_rng(int(rng), int(query_idx))

    if kind == "random":
        return _random_fill([], K, n_train, banned, gen)
    if kind in ("image_sim", "text_sim"):
        modality = "image" if kind == "image_sim" else "text"
        q = _query_row(embeddings, query_split, modality, query_idx)
        return _take_ranked(similarity_ranking(q, embeddings.get("train", modality)), K, banned, [])
    n_image = int(round(K * mix_image_fraction))
    q_img = _query_row(embeddings, query_split, "image", query_idx)
    q_txt = _query_row(embeddings, query_split, "text", query_idx)
    pool = _take_ranked(similarity_ranking(q_img, embeddings.train_image), n_image, banned, [])
    pool = _take_ranked(similarity_ranking(q_txt, embeddings.train_text), K, banned, pool)
    return _random_fill(pool, K, n_train, banned, gen)


def _take_ranked(ranking: list[int], size: int, banned: set[int], pool: list[int]) -> list[int]:
    """Extend ``pool`` from ``ranking`` (skipping banned and already chosen) until it holds ``size``."""
    out = list(pool)
    chosen = set(out)
    for i in ranking:
        if len(out) >= size:
            break
        if i not in banned and i not in chosen:
            out.append(i)
            chosen.add(i)
    return out


def _random_fill(pool: list[int], size: int, n_train: int, banned: set[int], gen: np.random.Generator) -> list[int]:
    """Append uniformly drawn unused ids until ``pool`` holds ``size``."""
    need = size - len(pool)
    if need <= 0:
        return list(pool)
    taken = banned | set(pool)
    free = np.array([i for i in range(n_train) if i not in taken], dtype=np.int64)
    picked = gen.choice(free, size=need, replace=False)
    return list(pool) + [int(i) for i in picked]


def build_pool_from_config(cfg: "SamplerConfig", query_idx: int, embeddings: Embeddings, seed: int, **kwargs) -> list[int]:
    """``build_pool`` with kind, K and mix fraction taken from a plan's ``sampler`` section."""
    return build_pool(cfg.kind, query_idx, embeddings, cfg.pool_size, seed, cfg.mix_image_fraction, **kwargs)
