"""LVLM scoring on the tiny Qwen2.5-VL: answer masking, batching, generation, gt_prob, rel_score."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from lever.models.answer_scores import answer_prob, gt_prob, gt_prob_batch, rel_score
from lever.models.lvlm import Example, postprocess_generation
from lever.models.prompting import most_common_answer

from lever_tiny_env import tiny_lvlm


@pytest.fixture(scope="module")
def lvlm():
    return tiny_lvlm()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((56, 56, 3)) * 255).astype("uint8")) for _ in range(5)]


QUESTIONS = ["What color is the circle?", "How many squares are there?", "What shape is shown?",
             "What color is the background?", "What color are the triangles?"]


def prompt_with_images(images, n_images: int, text_only_query: bool = False) -> list[Example]:
    """n_images images in total: n_images-1 ICDs with images plus the query with its image
    (n_images == 0: one text-only ICD and a text-only query)."""
    if n_images == 0:
        return [Example(None, QUESTIONS[0], "red"), Example(None, QUESTIONS[1])]
    icds = [Example(images[i], QUESTIONS[i], ["red", "3", "circle", "gray"][i % 4]) for i in range(n_images - 1)]
    return icds + [Example(images[4], QUESTIONS[4])]


@pytest.mark.parametrize("n_images", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("answer", ["red", "3", "two purple triangles", "grey."])
def test_answer_span_is_exactly_the_answer(lvlm, images, n_images, answer):
    prompt = prompt_with_images(images, n_images)
    enc = lvlm.encode(prompt, answer)
    prompt_only = lvlm.encode(prompt)
    # the unmasked span decodes to the answer and nothing else ...
    assert lvlm.tokenizer.decode(enc.ids[enc.answer_start:]) == answer
    # ... everything before it is the templated prompt with its generation prompt ...
    assert enc.ids[: enc.answer_start] == prompt_only.ids
    assert lvlm.tokenizer.decode(prompt_only.ids).endswith("<|im_start|>assistant\n")
    # ... which holds every vision token (4 per 56x56 image after the 2x2 merge)
    n_vis = sum(1 for t in enc.ids if t == lvlm.image_token_id)
    assert n_vis == 4 * n_images
    assert all(i < enc.answer_start for i, t in enumerate(enc.ids) if t == lvlm.image_token_id)


def test_encoding_matches_the_real_processor(lvlm, images):
    """Our per-image expansion of <|image_pad|> equals what Qwen2_5_VLProcessor produces."""
    prompt = prompt_with_images(images, 3)
    text = lvlm.prompt_text(prompt)
    ref = lvlm.processor(text=[text], images=[ex.image for ex in prompt], return_tensors="pt")
    enc = lvlm.encode(prompt)
    assert ref["input_ids"][0].tolist() == enc.ids
    assert torch.equal(ref["pixel_values"], torch.cat([im.pixel_values for im in enc.images]))


def test_answer_logprob_equals_an_independent_computation(lvlm, images):
    """Mean log-prob of the answer tokens, recomputed with the processor's inputs, the model's own
    rope positions and a plain unpadded forward pass."""
    prompt = prompt_with_images(images, 2)
    answer = "two purple triangles"
    ref = lvlm.processor(text=[lvlm.prompt_text(prompt) + answer], images=[ex.image for ex in prompt], return_tensors="pt")
    n = len(lvlm.tokenizer(answer, add_special_tokens=False)["input_ids"])
    ids = ref["input_ids"][0]
    assert lvlm.tokenizer.decode(ids[-n:]) == answer
    with torch.no_grad():
        logits = lvlm.model(**ref).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    expected = float(torch.stack([lp[t - 1, ids[t]] for t in range(len(ids) - n, len(ids))]).mean())
    got = lvlm.answer_logprob([prompt], [answer])[0]
    assert got == pytest.approx(expected, abs=1e-5)


def test_batched_scoring_equals_one_by_one(lvlm, images):
    prompts, answers = [], []
    for n in range(5):
        for a in ("red", "3 squares"):
            prompts.append(prompt_with_images(images, n))
            answers.append(a)
    batched = lvlm.answer_logprob(prompts, answers)
    single = [lvlm.answer_logprob([p], [a])[0] for p, a in zip(prompts, answers)]
    assert max(abs(b - s) for b, s in zip(batched, single)) < 1e-5
    assert len(set(round(x, 4) for x in batched)) > 3  # the numbers really differ by prompt


def test_generate_batched_with_left_padding_equals_one_by_one(lvlm, images):
    prompts = [prompt_with_images(images, n) for n in range(5)]
    batched = lvlm.generate(prompts, max_new_tokens=4)
    single = [lvlm.generate([p], max_new_tokens=4)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(g, str) for g in batched)


def test_gt_prob_weights_answers_by_annotator_counts(lvlm, images):
    prompt = prompt_with_images(images, 2)
    gts = ["two", "2", "2.", "Two", "3", "three", "blue", "2", "3", "2"]
    # normalized: "2" x6, "3" x3, "blue" x1
    p = {a: math.exp(lvlm.answer_logprob([prompt], [a])[0]) for a in ("2", "3", "blue")}
    expected = 0.6 * p["2"] + 0.3 * p["3"] + 0.1 * p["blue"]
    assert gt_prob(lvlm, prompt, gts) == pytest.approx(expected, rel=1e-5)
    per = gt_prob_batch(lvlm, [prompt], [gts])[0]
    assert set(per) == {"2", "3", "blue"}
    assert per["3"] == pytest.approx(p["3"], rel=1e-5)
    assert most_common_answer(gts) == "2"
    assert 0.0 < expected < 1.0


def test_answer_prob_is_geometric_mean_probability(lvlm, images):
    prompt = prompt_with_images(images, 1)
    lp = lvlm.answer_logprob([prompt], ["two purple triangles"])[0]
    assert answer_prob(lvlm, [prompt], ["two purple triangles"])[0] == pytest.approx(math.exp(lp))


def test_rel_score_token_f1_against_best_gt():
    assert rel_score("two dogs", ["2 dogs", "cat"]) == pytest.approx(1.0)
    assert rel_score("red car", ["red", "blue"]) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert rel_score("The Red.", ["red"]) == pytest.approx(1.0)
    assert rel_score("green", ["red", "blue"]) == 0.0
    assert rel_score("", ["red"]) == 0.0


@pytest.mark.parametrize("raw,expected", [
    ("red", "red"),
    (" red\nQuestion: what", "red"),
    ("3 Short answer: 4", "3"),
    ("blue Answer: x", "blue"),
    ("\nred", ""),
    ("two dogs", "two dogs"),
])
def test_postprocess_generation(raw, expected):
    assert postprocess_generation(raw) == expected


def test_empty_answer_is_refused(lvlm, images):
    with pytest.raises(ValueError):
        lvlm.answer_logprob([prompt_with_images(images, 1)], [""])


@pytest.mark.parametrize("answer", ["red", "2", "two purple triangles", " blue", "a\\nb"])
def test_tail_tokenization_equals_whole_text_tokenization(lvlm, images, answer):
    prompt = prompt_with_images(images, 2)
    enc = lvlm.encode(prompt, answer)
    text = lvlm._expand(lvlm.prompt_text(prompt), enc.images)
    whole = lvlm.tokenizer(text + answer, add_special_tokens=False)["input_ids"]
    assert enc.ids == whole


def test_cached_template_and_piecewise_tokens_equal_the_slow_path(lvlm, images):
    for n in range(5):
        for _ in range(4):  # past the self-checks: the cached paths alone
            prompt = prompt_with_images(images, n)
            assert lvlm.prompt_text(prompt) == lvlm._render(prompt)
            text = lvlm._expand(lvlm.prompt_text(prompt), lvlm.encode(prompt).images)
            assert lvlm._ids(text) == lvlm._tokenize(text)
    assert lvlm._segmented is not False


def test_per_part_ids_equal_whole_text_tokenization(lvlm, images):
    """encode builds a prompt's ids from cached per-part and per-text ids (no text is built);
    past the first-prompt checks of each layout they still equal tokenizing the whole text.
    A layout whose texts touch (text-only ICD before a text-only query) takes the whole-text
    route."""
    layouts = [prompt_with_images(images, n) for n in range(5)]
    layouts.append([Example(images[0], QUESTIONS[0], "red"), Example(None, QUESTIONS[1], "3"), Example(images[2], QUESTIONS[2])])
    for prompt in layouts:
        for _ in range(5):
            for answer in (None, "red", "two purple triangles", " blue"):
                enc = lvlm.encode(prompt, answer)
                text = lvlm._expand(lvlm._render(prompt), enc.images) + (answer or "")
                assert enc.ids == lvlm.tokenizer(text, add_special_tokens=False)["input_ids"]
    plans = {layout: bool(plan) for layout, plan in lvlm._plans.items()}
    assert plans[lvlm._layout(layouts[3])] is True  # the per-part route really ran ...
    assert plans[lvlm._layout(layouts[0])] is False  # ... and touching texts did not take it


def test_a_per_part_mismatch_falls_back_to_whole_text(lvlm, images):
    """If the per-part ids ever differ from whole-text tokenization (a tokenizer that merges
    across an added token), the layout's first-prompt check turns the route off."""
    prompt = prompt_with_images(images, 2)
    layout = lvlm._layout(prompt)
    saved = dict(lvlm._plans), dict(lvlm._plan_checks)
    try:
        lvlm._plans[layout] = [[[999]] + part for part in lvlm._segment_plan(prompt, layout)]  # a wrong plan
        lvlm._plan_checks[layout] = 0
        enc = lvlm.encode(prompt, "red")
        text = lvlm._expand(lvlm._render(prompt), enc.images) + "red"
        assert enc.ids == lvlm.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert lvlm._plans[layout] == []
    finally:
        lvlm._plans.clear()
        lvlm._plans.update(saved[0])
        lvlm._plan_checks.clear()
        lvlm._plan_checks.update(saved[1])
