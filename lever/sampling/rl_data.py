"""RL-data groups: candidate ICD sequences from several sources, each judged by the LVLM.

One query's record (DESIGN.md ``rl_data.jsonl``) is a pure function of (plan, query): the pool is
the one its InfoScore beams were searched over, and every random choice (random sequences, v2
temperature samples) draws from generators seeded by (plan seed, query id, source), never from a
global stream.  That is what makes a resumed shard byte-identical to an uninterrupted one.

Sources, in order (a duplicate -- same ICDs in the same order -- keeps its first source):
infoscore_beam, v2_beam, v2_sample, retrieval, random.  Then the group is topped up with random
sequences to its minimum size (>= beam size; the configured total unless
``variable_group_size``), and, with ``balanced``, random sequences are added until it holds both
a correct and an incorrect candidate (at most ``max_extra_per_query``).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from lever.config.schema import RLDataConfig
from lever.models.answer_scores import (
    answer_prob,
    geometric_mean_prob,
    gt_prob_batch,
    infoscore_gain,
    rel_score,
    weighted_gt_prob,
)
from lever.models.lvlm import LVLM, Example, postprocess_generation
from lever.models.prompting import answer_weights, most_common_answer

log = logging.getLogger(__name__)

Scorer = Callable[[list[list[Example]], list[str]], list[float]]

# salts of the per-query generators, one per use, so adding a source never shifts another's draws
_SALT_RANDOM = 1
_SALT_SAMPLE = 2
_SALT_BALANCED = 3


@dataclass(frozen=True)
class Candidate:
    positions: tuple[int, ...]
    source: str
    rank: int
    beam_score: float


def query_generator(seed: int, query_id: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(query_id), int(salt)])


# ------------------------------------------------------------------------------- sources


def infoscore_candidates(beam_rec: Optional[dict], count: int, shots: int) -> list[Candidate]:
    """The query's InfoScore beams, best first; beams longer than ``shots`` are cut to their
    prefix (a prefix of a beam is itself a beam-search state), shorter ones are skipped."""
    if not beam_rec:
        return []
    out = []
    for b in beam_rec["beams"][:count]:
        pos = tuple(b["positions"])
        if len(pos) >= shots:
            out.append(Candidate(pos[:shots], "infoscore_beam", int(b["rank"]), float(b["score"])))
    return out


def v2_beam_candidates(selector: Any, query_emb: torch.Tensor, pool_emb: torch.Tensor, shots: int, count: int) -> list[Candidate]:
    from lever.selectors.pointer import beam_search

    if count <= 0:
        return []
    res = beam_search(selector, query_emb, pool_emb, shots, count)
    return [Candidate(tuple(int(p) for p in pos), "v2_beam", r, float(lp)) for r, (pos, lp) in enumerate(res)]


def v2_sample_candidates(
    selector: Any, query_emb: torch.Tensor, pool_emb: torch.Tensor, shots: int,
    temperatures: Sequence[float], per_temperature: int, seed: int, query_id: int,
) -> list[Candidate]:
    from lever.selectors.pointer import sample

    if per_temperature <= 0:
        return []
    gen = torch.Generator().manual_seed(int(query_generator(seed, query_id, _SALT_SAMPLE).integers(2**62)))
    out: list[Candidate] = []
    for t in temperatures:
        for pos, lp in sample(selector, query_emb, pool_emb, shots, float(t), per_temperature, generator=gen):
            out.append(Candidate(tuple(int(p) for p in pos), "v2_sample", len(out), float(lp)))
    return out


def retrieval_candidates(query_emb: torch.Tensor, pool_emb: torch.Tensor, shots: int, count: int) -> list[Candidate]:
    """Sequences of the pool members most similar to the query (cosine of the embeddings).

    Combinations of the top ``shots + 2`` in rank order; each combination first with the most
    similar ICD last (nearest the query), then reversed.  Score = summed similarity.
    """
    if count <= 0:
        return []
    q = torch.nn.functional.normalize(query_emb.float(), dim=-1)
    c = torch.nn.functional.normalize(pool_emb.float(), dim=-1)
    sims = (c @ q).tolist()
    ranked = sorted(range(len(sims)), key=lambda i: (-sims[i], i))
    out: list[Candidate] = []
    seen: set[tuple[int, ...]] = set()
    for combo in itertools.combinations(ranked[: shots + 2], shots):
        asc = tuple(sorted(combo, key=lambda i: (sims[i], -i)))
        for seq in (asc, asc[::-1]):
            if seq in seen:
                continue
            seen.add(seq)
            out.append(Candidate(seq, "retrieval", len(out), float(sum(sims[i] for i in seq))))
            if len(out) >= count:
                return out
    return out


def random_sequences(rng: np.random.Generator, k: int, shots: int, n: int, taken: set[tuple[int, ...]], rank0: int = 0) -> list[Candidate]:
    """``n`` new random sequences (distinct ICDs, not already in ``taken``); fewer if the pool
    has run out of distinct orderings."""
    out: list[Candidate] = []
    tries = 0
    while len(out) < n and tries < 50 * max(n, 1) + 100:
        tries += 1
        seq = tuple(int(x) for x in rng.choice(k, size=shots, replace=False))
        if seq in taken:
            continue
        taken.add(seq)
        out.append(Candidate(seq, "random", rank0 + len(out), 0.0))
    return out


def dedup(cands: Sequence[Candidate]) -> list[Candidate]:
    seen: set[tuple[int, ...]] = set()
    out = []
    for c in cands:
        if c.positions not in seen:
            seen.add(c.positions)
            out.append(c)
    return out


# ------------------------------------------------------------------------------- judging


def _verdict(raw: str, per_answer: dict[str, float], gt_raw: Sequence[str], y: str, p0: float) -> dict[str, Any]:
    from lever.metrics import vqa_accuracy

    pred = postprocess_generation(raw)
    acc = float(vqa_accuracy(pred, list(gt_raw)))
    return {
        "raw_generation": raw,
        "pred_answer": pred,
        "correct": acc > 0,
        "acc_score": acc,
        "gt_prob": weighted_gt_prob(per_answer, gt_raw),
        "rel_score": float(rel_score(pred, gt_raw)),
        "info_score": float(infoscore_gain(per_answer[y], p0)),
        "eval_failed": False,
    }


def _failed(err: BaseException) -> dict[str, Any]:
    return {
        "raw_generation": "", "pred_answer": "", "correct": False, "acc_score": 0.0, "gt_prob": 0.0,
        "rel_score": 0.0, "info_score": 0.0, "eval_failed": True, "error": f"{type(err).__name__}: {err}"[:500],
    }


def reset_scorer(scorer: Any) -> None:
    """Per-query scorer state (the fast path's vision cache) starts empty: a query's output is
    then independent of the queries before it, which resume byte-identity relies on (beams, RL
    data and online rollouts alike)."""
    reset = getattr(scorer, "reset", None)
    if reset is not None:
        reset()


def judge(
    lvlm: LVLM, prompts: list[list[Example]], gt_raw: Sequence[str], y: str, p0: float,
    scorer: Optional[Scorer] = None, max_new_tokens: Optional[int] = None,
) -> list[dict[str, Any]]:
    """LVLM verdicts of several prompts of one query, batched; on a failure each prompt is retried
    alone so that one bad candidate is recorded as ``eval_failed`` instead of killing the shard."""

    both = getattr(scorer, "generate_and_score", None)

    def run(ps: list[list[Example]]) -> list[dict[str, Any]]:
        if both is None:
            raws = lvlm.generate(ps, max_new_tokens)
            pers = gt_prob_batch(lvlm, ps, [gt_raw] * len(ps), scorer=scorer)
        else:  # the fast path reads each prompt once for the verdict and gt_prob
            names = [a for a, _ in answer_weights(gt_raw)]
            raws, lps = both(ps, [names] * len(ps), max_new_tokens)
            pers = [{a: geometric_mean_prob(x) for a, x in zip(names, lp)} for lp in lps]
        return [_verdict(r, per, gt_raw, y, p0) for r, per in zip(raws, pers)]

    if not prompts:
        return []
    try:
        return run(prompts)
    except Exception as batch_err:  # noqa: BLE001 - isolate per candidate below
        log.warning("batched LVLM evaluation failed (%s); retrying candidates one by one", batch_err)
    out = []
    for p in prompts:
        try:
            out.append(run([p])[0])
        except Exception as e:  # noqa: BLE001
            out.append(_failed(e))
    return out


# ------------------------------------------------------------------------------- one query


@dataclass
class QueryInputs:
    """Everything one query's group depends on."""

    query_id: int
    question_id: int
    image_id: int
    question: str
    gt_answers_raw: list[str]
    query: Example
    pool_ids: list[int]
    pool: list[Example]
    query_emb: Optional[torch.Tensor] = None  # [d]
    pool_emb: Optional[torch.Tensor] = None  # [K, d]
    beam_rec: Optional[dict] = None


def build_group(inp: QueryInputs, rl_cfg: RLDataConfig, min_group: int, seed: int, selector: Any = None) -> list[Candidate]:
    """The candidate sequences (before judging) from the configured sources, deduplicated and
    topped up with random sequences to the group's minimum size."""
    src = rl_cfg.sources
    shots = rl_cfg.shots
    k = len(inp.pool)
    cands: list[Candidate] = []
    nominal = 0
    if src.infoscore_beam.enabled:
        got = infoscore_candidates(inp.beam_rec, src.infoscore_beam.count, shots)
        cands += got
        nominal += len(got)
    if selector is not None and inp.query_emb is not None:
        if src.v2_beam.enabled:
            cands += v2_beam_candidates(selector, inp.query_emb, inp.pool_emb, shots, src.v2_beam.count)
            nominal += src.v2_beam.count
        if src.v2_sample.enabled:
            cands += v2_sample_candidates(selector, inp.query_emb, inp.pool_emb, shots,
                                          src.v2_sample.temperatures, src.v2_sample.per_temperature, seed, inp.query_id)
            nominal += len(src.v2_sample.temperatures) * src.v2_sample.per_temperature
    if src.retrieval.enabled and inp.query_emb is not None:
        cands += retrieval_candidates(inp.query_emb, inp.pool_emb, shots, src.retrieval.count)
        nominal += src.retrieval.count
    rng = query_generator(seed, inp.query_id, _SALT_RANDOM)
    taken = {c.positions for c in cands}
    if src.random.enabled:
        cands += random_sequences(rng, k, shots, src.random.count, set(taken))
        nominal += src.random.count
    cands = dedup(cands)
    target = max(min_group, 1) if rl_cfg.variable_group_size else max(min_group, nominal, 1)
    if len(cands) < target:
        n_random = sum(c.source == "random" for c in cands)
        cands += random_sequences(rng, k, shots, target - len(cands), {c.positions for c in cands}, rank0=n_random)
    return cands


def candidate_record(inp: QueryInputs, c: Candidate, verdict: dict[str, Any]) -> dict[str, Any]:
    rec = {
        "icd_ids": [int(inp.pool_ids[p]) for p in c.positions],
        "positions": [int(p) for p in c.positions],
        "source": c.source,
        "rank": int(c.rank),
        "beam_score": float(c.beam_score),
    }
    rec.update(verdict)
    return rec


def query_record(
    inp: QueryInputs, lvlm: LVLM, rl_cfg: RLDataConfig, min_group: int, seed: int,
    selector: Any = None, scorer: Optional[Scorer] = None, max_new_tokens: Optional[int] = None,
) -> dict[str, Any]:
    """The full ``rl_data.jsonl`` line of one query."""
    from lever.metrics import normalize_answer

    if inp.query_id in inp.pool_ids:
        raise ValueError(f"query {inp.query_id} is in its own pool")
    score = scorer or (lambda ps, ans: answer_prob(lvlm, ps, ans))
    y = most_common_answer(inp.gt_answers_raw)
    cands = build_group(inp, rl_cfg, min_group, seed, selector)
    prompts = [[inp.pool[p] for p in c.positions] + [inp.query] for c in cands]
    try:
        p0 = score([[inp.query]], [y])[0]
    except Exception as e:  # noqa: BLE001 - the query itself cannot be scored: every verdict fails
        verdicts = [_failed(e) for _ in cands]
    else:
        verdicts = judge(lvlm, prompts, inp.gt_answers_raw, y, p0, scorer, max_new_tokens)
        bal = rl_cfg.balanced
        if bal.enabled:
            rng = query_generator(seed, inp.query_id, _SALT_BALANCED)
            extra = 0
            while extra < bal.max_extra_per_query and not _mixed(verdicts):
                n = min(4, bal.max_extra_per_query - extra)
                n_random = sum(c.source == "random" for c in cands)
                more = random_sequences(rng, len(inp.pool), rl_cfg.shots, n, {c.positions for c in cands}, rank0=n_random)
                if not more:
                    break
                cands += more
                verdicts += judge(lvlm, [[inp.pool[p] for p in c.positions] + [inp.query] for c in more],
                                  inp.gt_answers_raw, y, p0, scorer, max_new_tokens)
                extra += len(more)
    return {
        "schema_version": 1,
        "query_id": int(inp.query_id),
        "question_id": int(inp.question_id),
        "image_id": int(inp.image_id),
        "question": inp.question,
        "gt_answers_raw": list(inp.gt_answers_raw),
        "gt_answers": [normalize_answer(a) for a in inp.gt_answers_raw],
        "pool": [int(g) for g in inp.pool_ids],
        "candidates": [candidate_record(inp, c, v) for c, v in zip(cands, verdicts)],
    }


def _mixed(verdicts: Sequence[dict[str, Any]]) -> bool:
    ok = [v["correct"] for v in verdicts if not v["eval_failed"]]
    return any(ok) and not all(ok)
