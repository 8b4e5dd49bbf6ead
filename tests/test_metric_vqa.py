"""VQA accuracy on hand-worked cases (leave-one-annotator-out over 10 annotators)."""

from __future__ import annotations

import pytest

from lever.metrics import normalize_answer, vqa_accuracy


def ten(match: str, n_match: int, other: str = "blue") -> list[str]:
    return [match] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two.", "2"),                    # number word + trailing period + case
        ("a red circle!", "red circle"),  # article dropped, "!" next to nothing -> space, stripped
        ("black/white", "black white"),   # "/" inside a word becomes a space
        ("1,000", "1000"),                # comma inside a number is deleted
        ("3.5", "3.5"),                   # decimal point kept
        ("end. of", "end of"),            # period not before a digit deleted
        ("dont know", "don't know"),      # contraction table
        ("The  Shed", "shed"),            # "shed" is a word, not "she'd"
        ("\tyes\n", "yes"),
        ("ten", "10"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_exact_match_of_all_ten_is_one() -> None:
    assert vqa_accuracy("red", ["red"] * 10) == 1.0


def test_counts_of_matching_annotators() -> None:
    # m matching annotators out of 10. A matching annotator sees m-1 matches among the other 9,
    # a non-matching one sees m.  acc = [m*min(1,(m-1)/3) + (10-m)*min(1,m/3)] / 10
    # m=1: (1*0 + 9*(1/3)) / 10 = 3/10 = 0.3
    assert vqa_accuracy("red", ten("red", 1)) == pytest.approx(0.3)
    # m=2: (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3) / 10 = 6/10 = 0.6
    assert vqa_accuracy("red", ten("red", 2)) == pytest.approx(0.6)
    # m=3: (3*(2/3) + 7*1) / 10 = (2 + 7) / 10 = 0.9
    assert vqa_accuracy("red", ten("red", 3)) == pytest.approx(0.9)
    # m=4: (4*1 + 6*1) / 10 = 1.0
    assert vqa_accuracy("red", ten("red", 4)) == pytest.approx(1.0)
    assert vqa_accuracy("green", ten("red", 4)) == 0.0


def test_number_words_and_digits_match() -> None:
    answers = ["2", "2", "two", "Two.", "3", "3", "3", "3", "3", "3"]
    # all four "2"-spellings normalize to "2" -> m=4 -> 1.0
    assert vqa_accuracy("two", answers) == pytest.approx(1.0)
    assert vqa_accuracy("2", answers) == pytest.approx(1.0)
    # "3" given by 6 annotators -> 1.0 ; "4" by none -> 0
    assert vqa_accuracy("three", answers) == pytest.approx(1.0)
    assert vqa_accuracy("4", answers) == 0.0


def test_articles_punctuation_and_case_are_ignored() -> None:
    answers = ["a circle", "Circle.", "the circle", "square", "square", "square", "square", "square", "square", "square"]
    # 3 spellings of "circle" -> m=3 -> 0.9 (see the counts test)
    assert vqa_accuracy("The Circle!", answers) == pytest.approx(0.9)


def test_contractions() -> None:
    answers = ["don't know"] * 2 + ["no"] * 8
    # "dont know" -> "don't know": m=2 -> 0.6
    assert vqa_accuracy("dont know", answers) == pytest.approx(0.6)


def test_synonyms_are_not_merged() -> None:
    # normalization is lexical: "grey" is not "gray"
    assert vqa_accuracy("grey", ["gray"] * 10) == 0.0


def test_fewer_than_ten_answers() -> None:
    # N=1: exact match scoring
    assert vqa_accuracy("red", ["Red."]) == 1.0
    assert vqa_accuracy("blue", ["red"]) == 0.0
    # N=3, all match: each annotator sees 2 others -> min(1, 2/3) -> mean 2/3
    assert vqa_accuracy("red", ["red", "red", "red"]) == pytest.approx(2 / 3)
    # N=5, 4 match: matching ones see 3 -> 1; the other sees 4 -> 1 -> 1.0
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"]) == pytest.approx(1.0)
    # N=5, 2 match: matching see 1 -> 1/3 (x2); others see 2 -> 2/3 (x3): (2/3 + 2) / 5 = 8/15
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 3) == pytest.approx(8 / 15)


def test_empty_prediction() -> None:
    assert vqa_accuracy("", ten("red", 10)) == 0.0
    # an empty prediction only matches empty (or all-punctuation) annotations
    assert vqa_accuracy("  ", ["?"] * 4 + ["red"] * 6) == pytest.approx(1.0)


def test_empty_answer_list_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("red", [])


def test_result_is_always_in_unit_interval() -> None:
    import itertools

    vocab = ["red", "blue", "2", "two", ""]
    for combo in itertools.product(vocab, repeat=3):
        for pred in vocab:
            acc = vqa_accuracy(pred, list(combo) * 3 + [combo[0]])
            assert 0.0 <= acc <= 1.0
