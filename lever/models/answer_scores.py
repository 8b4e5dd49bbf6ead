"""Answer scores over LVLM log-probs (SPEC section 2): answer probability, InfoScore gain, gt_prob
and rel_score, in one place for the LVLM code, InfoScore beam search and RL data.

Why here, under ``models/``: the LVLM code itself (``QwenVLM.answer_logprob`` / ``gt_prob``, the fast
scorer) needs these formulas, and ``models/`` sits below ``sampling/`` in the layer order, so a home in
``sampling/`` would make the models import upward.  Everything is a pure function of log-probs,
probabilities or answer strings; the few that take an LVLM only ask it for ``answer_logprob``.

* answer probability ``P(y | prompt)`` = geometric mean of the answer tokens' probabilities =
  ``exp(mean token log-prob)`` (answer tokens only; the masking is the LVLM's job);
* InfoScore gain of a longer prompt = ``P(y | S+c, x) - P(y | S, x)``;
* ``gt_prob`` = sum over distinct normalized gt answers of ``P(answer) * count / total``;
* ``rel_score`` = best token-F1 of the normalized prediction against a normalized gt answer.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Optional, Protocol, Sequence

import torch

from lever.models.prompting import Example, answer_weights



class AnswerScorer(Protocol):
    """What these formulas ask of an LVLM (``lever.models.lvlm.LVLM`` has it): declared here so that
    this module stays below the LVLM interface instead of importing it back."""

    def answer_logprob(self, prompts: list[list[Example]], answers: list[str]) -> list[float]: ...

__all__ = [
    "mean_token_logprob",
    "geometric_mean_prob",
    "answer_prob",
    "infoscore_gain",
    "gt_prob_batch",
    "weighted_gt_prob",
    "gt_prob",
    "token_f1",
    "rel_score",
]


def mean_token_logprob(token_lp: torch.Tensor) -> float:
    """Mean log-prob of an answer's tokens: ``log`` of the geometric-mean token probability."""
    return float(token_lp.mean())


def geometric_mean_prob(mean_logprob: float) -> float:
    """Answer probability from its mean token log-prob: ``exp(mean log-prob)``."""
    return math.exp(mean_logprob)


def answer_prob(lvlm: AnswerScorer, prompts: list[list[Example]], answers: list[str]) -> list[float]:
    """Geometric-mean probability of each answer's tokens: exp(mean log-prob)."""
    return [geometric_mean_prob(lp) for lp in lvlm.answer_logprob(prompts, answers)]


def infoscore_gain(p_with: float, p_without: float) -> float:
    """InfoScore of the ICD(s) that turn the shorter prompt into the longer one:
    ``P(y | S+c, x) - P(y | S, x)``.  Summed over a beam's steps it telescopes to
    ``P(y | S, x) - P(y | x)``."""
    return p_with - p_without


def gt_prob_batch(
    lvlm: AnswerScorer,
    prompts: list[list[Example]],
    gt_answers_raw: list[Sequence[str]],
    scorer: Optional[Callable[[list[list[Example]], list[str]], list[float]]] = None,
) -> list[dict[str, float]]:
    """Per prompt, the probability of each distinct normalized gt answer, in one batched call.

    Returned dicts map normalized answer -> geometric-mean probability; combine with
    :func:`weighted_gt_prob`.  ``scorer`` (prompts, answers) -> probabilities replaces the plain
    path (the fast scorer gives the same numbers).  Answers are grouped by VQA normalization ("Two", "2." and "two"
    are one answer, scored as "2") because that is the form correctness is judged in.
    """
    flat_p: list[list[Example]] = []
    flat_a: list[str] = []
    for p, gts in zip(prompts, gt_answers_raw):
        for a, _ in answer_weights(gts):
            flat_p.append(p)
            flat_a.append(a)
    score = scorer or (lambda ps, ans: answer_prob(lvlm, ps, ans))
    probs = score(flat_p, flat_a) if flat_p else []
    out: list[dict[str, float]] = []
    k = 0
    for gts in gt_answers_raw:
        d: dict[str, float] = {}
        for a, _ in answer_weights(gts):
            d[a] = probs[k]
            k += 1
        out.append(d)
    return out


def weighted_gt_prob(per_answer: dict[str, float], gt_answers_raw: Sequence[str]) -> float:
    """sum over distinct answers of P(answer) * count/total."""
    return float(sum(per_answer[a] * w for a, w in answer_weights(gt_answers_raw)))


def gt_prob(lvlm: AnswerScorer, prompt: list[Example], gt_answers_raw: Sequence[str]) -> float:
    """Probability of the ground truth under the LVLM, weighted by annotator counts."""
    per = gt_prob_batch(lvlm, [prompt], [gt_answers_raw])[0]
    return weighted_gt_prob(per, gt_answers_raw)


def token_f1(pred: list[str], gt: list[str]) -> float:
    """SQuAD-style token F1 of two token lists (two empty lists agree: 1.0)."""
    if not pred or not gt:
        return 1.0 if pred == gt else 0.0
    common = sum((Counter(pred) & Counter(gt)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(gt)
    return 2 * p * r / (p + r)


def rel_score(prediction: str, gt_answers_raw: Sequence[str]) -> float:
    """Token-F1 of the prediction against the best-matching gt answer (VQA-normalized tokens)."""
    from lever.metrics import normalize_answer

    pred = normalize_answer(prediction).split()
    gts = {normalize_answer(a) for a in gt_answers_raw}
    if not gts:
        return 0.0
    return max(token_f1(pred, g.split()) for g in sorted(gts))
