"""The tiny offline Qwen2.5-VL: deterministic build, own tokenizer, warm-up that makes answers vary."""

from __future__ import annotations

import torch

from lever.config.schema import LVLMConfig
from lever.models.tiny_qwen import SPECIAL_TOKENS, build_tiny_qwen, build_tokenizer

from lever_tiny_env import tiny_lvlm, tiny_plan


def test_tokenizer_covers_any_string_and_keeps_special_ids_in_vocab():
    tok = build_tokenizer()
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(t) == i
    for text in ["What color is the circle?", "Ünïcödé 日本 ✓", "3.5 x\n\ty"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # common dataset words are single tokens, not byte soup
    assert len(tok.tokenize(" triangle")) == 1


def test_random_build_is_deterministic_for_a_seed():
    cfg = LVLMConfig(kind="tiny_qwen2_5_vl", dtype="float32", device="cpu", min_pixels=3136, max_pixels=3136,
                     warmup_steps=0, seed=3)
    a, _ = build_tiny_qwen(cfg)
    b, _ = build_tiny_qwen(cfg)
    c, _ = build_tiny_qwen(cfg.model_copy(update={"seed": 4}))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_warmed_up_model_answers_some_questions_and_icds_matter():
    """Without the warm-up every candidate is wrong (zero reward variance); with it some answers
    are right, and the ICDs shown change some answers."""
    from lever.data.synthetic import generate_split
    from lever.metrics import vqa_accuracy
    from lever.models.lvlm import Example, postprocess_generation
    from lever.models.prompting import most_common_answer

    assert tiny_plan().lvlm.warmup_steps > 0
    lvlm = tiny_lvlm()
    q_json, a_json, images = generate_split("val", 24, 56, 123)
    anns = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in a_json["annotations"]}
    items = [(images[q["image_id"]], q["question"], anns[q["question_id"]]) for q in q_json["questions"]]
    zero = lvlm.generate([[Example(im, qu)] for im, qu, _ in items])
    acc = [vqa_accuracy(postprocess_generation(g), gt) for g, (_, _, gt) in zip(zero, items)]
    assert sum(a > 0 for a in acc) >= 4
    shots = [[Example(items[(i + 1) % 24][0], items[(i + 1) % 24][1], most_common_answer(items[(i + 1) % 24][2])),
              Example(im, qu)] for i, (im, qu, _) in enumerate(items)]
    one = lvlm.generate(shots)
    assert sum(a != b for a, b in zip(zero, one)) >= 1
