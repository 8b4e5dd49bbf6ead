"""The testbed's planted in-context task: generator, oracle reference, tokenizer, ablation reward.

The end-to-end claims (a trained selector beats random, the oracle bounds it, a harmful signal is
caught) live in ``test_testbed_learning.py``; these are the pieces they stand on.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from lever.data.synthetic import (CODE_WORDS, COLORS, PLANTED_QUESTION, PLANTED_TYPE, SyntheticLayout, code_words,
                                  generate_split, planted_labels, vocabulary, write_synthetic)
from lever.inference.selection import choose_oracle
from lever.models.prompting import most_common_answer


def _items(split: str, n: int, seed: int, fraction: float, noise: float = 0.0):
    q_json, a_json, _ = generate_split(split, n, 24, seed, planted_fraction=fraction, planted_noise=noise)
    anns = {a["question_id"]: a for a in a_json["annotations"]}
    return [(q, anns[q["question_id"]]) for q in q_json["questions"]]


def test_planted_share_and_answers_follow_the_seeded_colour_mapping():
    items = _items("train", 600, 5, 0.4)
    planted = [(q, a) for q, a in items if a["question_type"] == PLANTED_TYPE]
    share = len(planted) / len(items)
    assert 0.33 < share < 0.47, share
    mapping = code_words(5)
    assert sorted(mapping) == sorted(COLORS) and len(set(mapping.values())) == len(COLORS)
    for q, a in planted:
        assert q["question"] == PLANTED_QUESTION
        # the question never names the colour: only a demonstration's image can carry it
        assert a["planted_value"] not in q["question"].lower()
        assert most_common_answer([x["answer"] for x in a["answers"]]) == mapping[a["planted_value"]]
    # every colour occurs, so every code word is learnable from some demonstration
    assert set(Counter(a["planted_value"] for _, a in planted)) == set(COLORS)


def test_planted_noise_gives_another_dataset_word_to_that_share():
    items = [(q, a) for q, a in _items("train", 800, 5, 0.5, noise=0.2) if a["question_type"] == PLANTED_TYPE]
    mapping = code_words(5)
    other = [a for _, a in items if most_common_answer([x["answer"] for x in a["answers"]]) != mapping[a["planted_value"]]]
    assert 0.13 < len(other) / len(items) < 0.27
    # the other word is still one of the dataset's words (annotators agree on it), never a random string
    assert all(most_common_answer([x["answer"] for x in a["answers"]]) in mapping.values() for a in other)
    # noise leaves images and question types alone: the same draws with and without it
    clean = _items("train", 800, 5, 0.5, noise=0.0)
    assert [(q["image_id"], a["question_type"]) for q, a in clean] == \
        [(q["image_id"], a["question_type"]) for q, a in _items("train", 800, 5, 0.5, noise=0.2)]


def test_train_and_val_share_the_mapping_and_seeds_change_it():
    train = {a["planted_value"]: most_common_answer([x["answer"] for x in a["answers"]])
             for _, a in _items("train", 300, 2, 0.5) if a["question_type"] == PLANTED_TYPE}
    val = {a["planted_value"]: most_common_answer([x["answer"] for x in a["answers"]])
           for _, a in _items("val", 300, 2, 0.5) if a["question_type"] == PLANTED_TYPE}
    assert train == val == {c: code_words(2)[c] for c in train}
    assert any(code_words(s) != code_words(2) for s in (0, 1, 3))


def test_fraction_zero_has_no_planted_questions():
    assert not [a for _, a in _items("train", 200, 0, 0.0) if a["question_type"] == PLANTED_TYPE]


def test_planted_labels_read_back_from_the_written_files(tmp_path):
    layout = write_synthetic(tmp_path, 40, 12, 24, 1, planted_fraction=0.5)
    labels = planted_labels(layout)
    for split in ("train", "val"):
        anns = json.loads(layout.annotations(split).read_text())["annotations"]
        for a in anns:
            # planted: the colour decides the answer; ordinary: the (canonical) answer itself
            want = a["planted_value"] if a["question_type"] == PLANTED_TYPE else \
                most_common_answer([x["answer"] for x in a["answers"]])
            assert labels[a["question_id"]] == (a["question_type"], want)
    doc = json.loads(layout.annotations("train").read_text())
    del doc["annotations"][0]["planted_value"]
    layout.annotations("train").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="no planted_value"):
        planted_labels(SyntheticLayout(tmp_path))


def test_code_words_are_single_tokens_of_both_tiny_tokenizers():
    from lever.models.tiny_qwen import build_tokenizer

    tok = build_tokenizer()
    for w in CODE_WORDS:
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    vocab = set(vocabulary())
    assert set(CODE_WORDS) <= vocab and {"code", "word"} <= vocab


def test_oracle_prefers_same_type_and_value_then_value_then_similarity():
    # pool members: (question type, planted value); image similarity to the query decides ties
    labels = [("code", "red"), ("color", "red"), ("code", "blue"), ("code", "red"), ("shape", "green")]
    train_img = torch.eye(5)
    query_img = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8])
    pool = [0, 1, 2, 3, 4]
    # tier 0: items 0 and 3 (code/red), 3 more similar; tier 1: item 1 (red); then by similarity: 4, 2
    assert choose_oracle(("code", "red"), labels, query_img, train_img, pool, 1) == [3]
    assert choose_oracle(("code", "red"), labels, query_img, train_img, pool, 2) == [0, 3]
    assert choose_oracle(("code", "red"), labels, query_img, train_img, pool, 4) == [4, 1, 0, 3]
    # restricted pool: only what the pool holds
    assert choose_oracle(("code", "red"), labels, query_img, train_img, [1, 2, 4], 2) == [4, 1]


def test_oracle_is_a_unit_only_on_synthetic_data():
    from lever.config import load_plan
    from lever.inference.variants import infer_variants

    assert "oracle" in infer_variants(load_plan("baseline", "tiny"))
    assert "oracle" not in infer_variants(load_plan("baseline", "tiny", ["data.dataset=okvqa"]))
    assert "oracle" not in infer_variants(load_plan("baseline", "cluster", ["infer.baselines=[random,oracle]"]))


def test_negated_reward_is_the_sign_flipped_plan_reward():
    from lever.config import load_plan
    from lever.rl.rewards import compute_reward, plan_reward

    cand = {"correct": True, "acc_score": 0.6, "gt_prob": 0.3, "rel_score": 1.0, "beam_score": 0.2}
    plan = load_plan("baseline", "tiny")
    assert plan_reward(cand, plan.reward) == pytest.approx(1.6) == compute_reward(cand, "hard_plus_soft")
    neg = load_plan("baseline", "tiny", ["reward.negate=true"])
    assert plan_reward(cand, neg.reward) == pytest.approx(-1.6)
