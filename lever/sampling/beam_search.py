"""InfoScore beam search over a query's candidate pool (SPEC section 2).

InfoScore of adding ICD c to sequence S for query (x, y) is P(y | S+c, x) - P(y | S, x), with P the
geometric-mean probability of y's tokens (``exp`` of ``answer_logprob``); both formulas live in
:mod:`lever.models.answer_scores`.  A beam's score is the
sum of its steps' gains, which telescopes to P(y | S, x) - P(y | x).

Prompt order: see :mod:`lever.models.prompting` -- the ICD chosen at step t is appended after the
ones chosen before it, right before the query; ``positions[0]`` is the first ICD of the prompt.

Cost: one batched ``answer_logprob`` call per step covering every (beam, remaining candidate)
pair, i.e. 1 + K + (S-1)*B*(K-1) scorings per query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from lever.models.answer_scores import answer_prob, infoscore_gain
from lever.models.lvlm import LVLM, Example

# Batched scorer: (prompts, answers) -> geometric-mean probabilities.  Defaults to the LVLM's
# plain path; the fast path (``lever.models.fast_scoring``) plugs in here with equal numbers.
Scorer = Callable[[list[list[Example]], list[str]], list[float]]


@dataclass(frozen=True)
class Beam:
    positions: tuple[int, ...]  # local positions in the pool, prompt order
    score: float  # summed InfoScore gains
    prob: float  # P(y | sequence, x)


def plain_scorer(lvlm: LVLM) -> Scorer:
    return lambda prompts, answers: answer_prob(lvlm, prompts, answers)


def _top(cands: list[Beam], k: int) -> list[Beam]:
    """The k best by summed score; ties by positions, so float noise in equal scores cannot
    reorder them."""
    return sorted(cands, key=lambda x: (-x.score, x.positions))[:k]


def infoscore_beam_search(
    scorer: Scorer,
    query: Example,
    answer: str,
    pool: Sequence[Example],
    beam_size: int,
    shots: int,
) -> tuple[list[Beam], float]:
    """Top ``beam_size`` sequences of length ``shots`` (best first) and P(y | x) (zero-shot).

    Every step extends every beam by every candidate it does not yet hold and keeps the global
    top-B by summed score; ties are broken by the positions (lexicographic) so the result does
    not depend on float noise in the ordering of equal scores.
    """
    if query.answer is not None:
        raise ValueError("the query example must have answer=None")
    if shots > len(pool):
        raise ValueError(f"cannot pick {shots} distinct ICDs from a pool of {len(pool)}")
    if beam_size < 1 or shots < 1:
        raise ValueError("beam_size and shots must be >= 1")
    # the zero-shot P(y | x) rides along with the first step's scorings (one call, one batch)
    first = [[pool[c], query] for c in range(len(pool))]
    p0, *probs = scorer([[query]] + first, [answer] * (len(first) + 1))
    beams = _top([Beam((c,), infoscore_gain(p, p0), p) for c, p in enumerate(probs)], beam_size)
    for _ in range(shots - 1):
        ext: list[tuple[Beam, int]] = [(b, c) for b in beams for c in range(len(pool)) if c not in b.positions]
        prompts = [[pool[p] for p in b.positions] + [pool[c], query] for b, c in ext]
        probs = scorer(prompts, [answer] * len(prompts))
        beams = _top([Beam(b.positions + (c,), b.score + infoscore_gain(p, b.prob), p) for (b, c), p in zip(ext, probs)], beam_size)
    return beams, p0


def beam_record(
    query_id: int,
    question_id: int,
    pool_ids: Sequence[int],
    beams: Sequence[Beam],
) -> dict:
    """The ``beams.jsonl`` line of DESIGN.md for one query."""
    return {
        "query_id": int(query_id),
        "question_id": int(question_id),
        "pool": [int(g) for g in pool_ids],
        "beams": [
            {
                "icd_ids": [int(pool_ids[p]) for p in b.positions],
                "positions": [int(p) for p in b.positions],
                "score": float(b.score),
                "rank": r,
            }
            for r, b in enumerate(beams)
        ],
    }


def check_beam_record(rec: dict, beam_size: int, shots: int, where: str = "") -> Optional[str]:
    """Why a beams record breaks an invariant (None when it holds); used by tests and readers."""
    pool = rec["pool"]
    if rec["query_id"] in pool:
        return f"{where}query {rec['query_id']} is in its own pool"
    if len(set(pool)) != len(pool):
        return f"{where}pool of query {rec['query_id']} has repeats"
    beams = rec["beams"]
    if len(beams) != min(beam_size, _n_sequences(len(pool), shots)):
        return f"{where}query {rec['query_id']} has {len(beams)} beams, expected {beam_size}"
    scores = [b["score"] for b in beams]
    if any(a < b for a, b in zip(scores, scores[1:])):
        return f"{where}beam scores of query {rec['query_id']} are not sorted best first"
    for r, b in enumerate(beams):
        if b["rank"] != r or len(b["positions"]) != shots or len(set(b["positions"])) != shots:
            return f"{where}beam {r} of query {rec['query_id']} has a bad rank/length/repeat"
        if [pool[p] for p in b["positions"]] != b["icd_ids"]:
            return f"{where}beam {r} of query {rec['query_id']}: icd_ids do not match positions"
    return None


def _n_sequences(k: int, s: int) -> int:
    n = 1
    for i in range(s):
        n *= k - i
    return n
