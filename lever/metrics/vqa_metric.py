"""Standard VQA accuracy (VQAv2 / OKVQA evaluation), re-implemented so scoring needs no extra package.

Variant adopted (documented because published numbers differ by which one is used):

* **Normalization** follows the official ``vqaEval.py`` *as it behaves*, applied to the prediction
  and to every ground-truth answer:
  1. newlines/tabs -> spaces, strip;
  2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: a mark next to a space, or any mark
     when the text contains a digit-comma-digit group ("1,000"), is deleted; otherwise it becomes a
     space (so "black/white" -> "black white", "1,000" -> "1000");
  3. a period is deleted unless a digit follows it, so decimals survive ("3.5", ".5") and
     sentence periods do not ("red." -> "red", "5." -> "5"); this is the official regex's effective
     behaviour;
  4. lowercase, split on whitespace, number words "none"/"zero".."ten" -> digits, articles
     a/an/the dropped, apostrophe-less contractions restored from a table ("dont" -> "don't").
* **Deviation from the script**: the official code normalizes only when the ten ground-truth
  answers are not all identical; we always normalize. The two agree whenever the annotators
  disagree; when they all wrote the same string, ours also accepts e.g. "Two." for "2".
* **Leave-one-annotator-out**: for each of the N annotators, acc_i = min(1, m_i / 3) where m_i is
  the number of *other* annotators whose answer equals the prediction; the result is the mean over
  i. With 10 answers this gives 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >=4 matching annotators.
  Fewer than 10 answers use the same formula over the N present; N == 1 (no "others") is scored as
  an exact-match: 1.0 if it matches, else 0.0. An empty answer list is a data error (ValueError).
"""

from __future__ import annotations

import re
from typing import Sequence

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})


def _contractions() -> dict[str, str]:
    """Apostrophe-less spellings annotators typed -> the canonical contraction.

    Built from base forms so the table stays readable; keys never contain an apostrophe.
    """
    canon = [
        "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
        "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
        "i'd", "i'd've", "i'm", "i've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't",
        "mightn't've", "might've", "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't",
        "shan't", "she'd", "she'd've", "she'll", "she's", "should've", "shouldn't",
        "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd",
        "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll",
        "that's", "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll",
        "they're", "they've", "'twas", "wasn't", "we'd", "we'd've", "we'll", "we're", "we've", "weren't",
        "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd",
        "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've",
        "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll",
        "you're", "you've",
    ]
    table = {c.replace("'", ""): c for c in canon}
    # Words that are also ordinary English when the apostrophe is dropped must not be rewritten.
    for word in ("shed", "shell", "well", "were", "wed", "id", "lets"):
        table.pop(word, None)
    return table


_CONTRACTIONS = _contractions()


def _process_punctuation(text: str) -> str:
    out = text
    has_number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text) or (" " + p in text) or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def _process_words(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(s: str) -> str:
    """Canonical form of an answer string under the standard VQA evaluation (see module doc)."""
    text = s.replace("\n", " ").replace("\t", " ").strip()
    return _process_words(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy in [0, 1] of ``prediction`` against the annotators' ``answers``.

    Leave-one-annotator-out average of min(1, matches among the others / 3); see module doc for
    the normalization and for fewer than 10 answers.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer, got an empty list")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    hits = [g == pred for g in gts]
    if len(gts) == 1:
        return 1.0 if hits[0] else 0.0
    total_hits = sum(hits)
    acc = 0.0
    for hit in hits:
        others = total_hits - (1 if hit else 0)
        acc += min(1.0, others / 3.0)
    return acc / len(gts)


def gt_answer_counts(answers: Sequence[str]) -> dict[str, int]:
    """Normalized answer -> number of annotators who gave it (used to weight gt probabilities)."""
    counts: dict[str, int] = {}
    for a in answers:
        n = normalize_answer(a)
        counts[n] = counts.get(n, 0) + 1
    return counts
