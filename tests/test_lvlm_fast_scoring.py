"""The fast scoring path gives the plain path's numbers (fp32, within 1e-4)."""

from __future__ import annotations

import pytest

from lever.data.dataset import load_index
from lever.models.fast_scoring import FastScorer
from lever.models.lvlm import Example
from lever.models.prompting import icd_example, most_common_answer, query_example

from lever_tiny_env import tiny_data, tiny_lvlm


@pytest.fixture(scope="module")
def setup():
    lvlm = tiny_lvlm()
    index = load_index(tiny_data() / "prepare-data")
    q = index.train[0]
    pool = [icd_example(index.train[g]) for g in range(1, 13)]
    return lvlm, query_example(q), most_common_answer(q.answers), pool


def _compare(lvlm, prompts, answers, max_batch=None, max_tokens=None):
    fast = FastScorer(lvlm, max_batch=max_batch, max_tokens=max_tokens)
    got = fast.answer_logprob(prompts, answers)
    ref = lvlm.answer_logprob(prompts, answers)
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4
    return fast


def test_beam_step_batch(setup):
    lvlm, q, y, pool = setup
    prompts = [[q]] + [[pool[c], q] for c in range(12)]
    prompts += [[pool[b], pool[c], q] for b in (0, 3, 5) for c in range(12) if c != b]
    fast = _compare(lvlm, prompts, [y] * len(prompts))
    assert fast.forwards < len(prompts) / 4  # batched, not one forward per prompt
    assert len(fast._features) == len({str(p.image) for p in pool} | {str(q.image)})
    assert fast.vision_forwards == 1  # every image in one vision pass, never again


def test_several_answers_per_prompt_share_the_prompt(setup):
    lvlm, q, y, pool = setup
    prompts = [[pool[1], pool[2], q]] * 4 + [[pool[3], q]] * 3
    answers = ["red", "2", "two purple triangles", y, "circle", "3", "gray"]
    _compare(lvlm, prompts, answers)


def test_equal_text_with_different_images_is_not_shared(setup):
    """Two ICDs with the same question and answer but different images tokenize identically; the
    prefix cache must still keep them apart (a bug this test caught)."""
    lvlm, q, y, pool = setup
    a, b = pool[4], pool[7]
    twin = Example(b.image, a.question, a.answer)
    assert a.image != twin.image
    prompts = [[a, q], [twin, q], [a, pool[0], q], [twin, pool[0], q]]
    _compare(lvlm, prompts, [y] * 4)


def test_text_only_and_big_groups_split_across_chunks(setup):
    lvlm, q, y, pool = setup
    text_q = Example(None, q.question)
    prompts = [[Example(None, "What shape is shown?", "circle"), text_q]] * 3
    prompts += [[pool[0], pool[c], q] for c in range(1, 12)]
    _compare(lvlm, prompts, ["circle", y, "2"] + [y] * 11, max_batch=4)


def test_vision_features_are_encoded_once(setup):
    lvlm, q, y, pool = setup
    fast = FastScorer(lvlm)
    fast.answer_logprob([[pool[c], q] for c in range(6)], [y] * 6)
    n = len(fast._features)
    assert n == len({str(pool[c].image) for c in range(6)} | {str(q.image)})
    calls, vis = fast.forwards, fast.vision_forwards
    fast.answer_logprob([[pool[c], pool[c + 1], q] for c in range(5)], [y] * 5)
    assert len(fast._features) == n and fast.vision_forwards == vis  # no image encoded again ...
    assert fast.forwards - calls == 2  # ... so the call is one prefix + one suffix pass


def test_rope_positions_match_the_models_own(setup):
    import torch

    from lever.models.fast_scoring import rope_positions

    lvlm, q, y, pool = setup
    for prompt in ([q], [pool[0], q], [pool[1], pool[2], pool[3], q], [Example(None, "x?", "1"), Example(None, "y?")]):
        e = lvlm.encode(prompt, y)
        ids = torch.tensor([e.ids])
        grid = torch.stack([im.grid_thw for im in e.images]) if e.images else None
        ref, _ = lvlm.model.model.get_rope_index(ids, mm_token_type_ids=(ids == lvlm.image_token_id).int(), image_grid_thw=grid)
        got = rope_positions(e.ids, [tuple(im.grid_thw.tolist()) for im in e.images], lvlm.image_token_id, lvlm.merge)
        assert ref[:, 0].tolist() == got


def test_bench_scoring_prints_agreement_and_speedup():
    from lever_tiny_env import tiny_plan

    from lever.bench.scoring import run_scoring_bench

    lines: list[str] = []
    res = run_scoring_bench(tiny_plan().lvlm, ref=(8, 2, 2), ks=(8,), shots=(1, 2), n_queries=1, repeats=1,
                            n_train=16, echo=lines.append)
    assert lines[-1].startswith("speedup: ") and float(lines[-1].split()[1]) > 0
    assert any("agreement" in x and "(ok)" in x for x in lines)
    assert {(r.K, r.B, r.S) for r in res} == {(8, 2, 1), (8, 2, 2)}
    assert all(r.max_abs_diff < 1e-4 and r.scorings > 0 for r in res)


def test_batched_rope_positions_equal_the_per_sequence_rule(setup):
    """Left- and right-padded batches, several images per row, text-only rows, and the
    suffix rule (a suffix's positions = its own positions + the prefix's next position)."""
    import torch

    from lever.models.fast_scoring import rope_positions, rope_positions_batch

    lvlm, q, y, pool = setup
    prompts = [[q], [pool[0], q], [pool[1], pool[2], pool[3], q], [Example(None, "x?", "1"), Example(None, "y?")],
               [pool[4], Example(None, "z?", "2"), q]]
    encs = [lvlm.encode(p, y) for p in prompts]
    grids = [[tuple(int(v) for v in im.grid_thw.tolist()) for im in e.images] for e in encs]
    ref = [rope_positions(e.ids, g, lvlm.image_token_id, lvlm.merge) for e, g in zip(encs, grids)]
    L = max(len(e.ids) for e in encs)
    for left in (True, False):
        rows, valid = [], []
        for e in encs:
            pad = [lvlm.pad_id] * (L - len(e.ids))
            rows.append(pad + e.ids if left else e.ids + pad)
            valid.append([0] * len(pad) + [1] * len(e.ids) if left else [1] * len(e.ids) + [0] * len(pad))
        pos, nxt = rope_positions_batch(torch.tensor(rows), torch.tensor(valid), grids, lvlm.image_token_id, lvlm.merge)
        for r, (e, want) in enumerate(zip(encs, ref)):
            sl = slice(L - len(e.ids), L) if left else slice(0, len(e.ids))
            assert pos[:, r, sl].tolist() == want
            assert int(nxt[r]) == max(max(axis) for axis in want) + 1
    # suffix rule: split every sequence before its last ICD's image
    e, g = encs[2], grids[2]
    cut = [t for t, x in enumerate(e.ids) if x == lvlm.tokenizer.convert_tokens_to_ids("<|vision_start|>")][-2]
    pre, pnext = rope_positions_batch(torch.tensor([e.ids[:cut]]), torch.ones(1, cut), [g[:2]], lvlm.image_token_id, lvlm.merge)
    suf, _ = rope_positions_batch(torch.tensor([e.ids[cut:]]), torch.ones(1, len(e.ids) - cut), [g[2:]],
                                  lvlm.image_token_id, lvlm.merge)
    assert torch.cat([pre[:, 0], suf[:, 0] + pnext[0]], dim=1).tolist() == ref[2]


def test_token_budget_splits_passes_without_changing_numbers(setup):
    lvlm, q, y, pool = setup
    prompts = [[pool[b], pool[c], q] for b in (0, 3) for c in range(12) if c != b]
    big = _compare(lvlm, prompts, [y] * len(prompts))
    small = _compare(lvlm, prompts, [y] * len(prompts), max_tokens=200)
    assert small.forwards > big.forwards  # the budget really split the work


def test_a_lone_prompt_runs_in_one_pass(setup):
    lvlm, q, y, pool = setup
    fast = _compare(lvlm, [[pool[0], pool[1], q]], [y])
    assert fast.forwards == 1  # nothing to share: no separate prefix pass


def test_bf16_path_runs_and_agrees_within_bf16_noise():
    """The GPU configuration's dtype (bf16) through the same code: catches dtype mismatches in
    image splicing, the prefix cache and the answer-only LM head (no GPU needed)."""
    from lever.data.dataset import load_index
    from lever.models.factory import build_lvlm

    from lever_tiny_env import tiny_plan

    lvlm = build_lvlm(tiny_plan("lvlm.dtype=bfloat16").lvlm)
    assert next(lvlm.model.parameters()).dtype.is_floating_point and str(lvlm.dtype) == "torch.bfloat16"
    index = load_index(tiny_data() / "prepare-data")
    q, y = query_example(index.train[0]), most_common_answer(index.train[0].answers)
    pool = [icd_example(index.train[g]) for g in range(1, 7)]
    prompts = [[q]] + [[pool[c], q] for c in range(6)] + [[pool[0], pool[c], q] for c in range(1, 6)]
    got = FastScorer(lvlm).answer_logprob(prompts, [y] * len(prompts))
    ref = lvlm.answer_logprob(prompts, [y] * len(prompts))
    assert max(abs(a - b) for a, b in zip(got, ref)) < 5e-2


def test_generate_and_score_reads_each_prompt_once_and_equals_the_separate_calls(setup):
    """RL data's one-pass path: the generations are the plain path's, and the answers scored on
    the generation's own key/value cache equal ``answer_logprob``; prompts of different lengths
    (left padding), several generation batches, a text-only prompt, 1-3 answers per prompt."""
    lvlm, q, y, pool = setup
    prompts = [[pool[c], pool[c + 1], q] for c in range(5)] + [[q], [pool[7], q], [Example(None, "How many?", "2"), Example(None, q.question)]]
    answers = [[y, "2"]] * 5 + [["red"], [y, "two purple triangles", "3"], ["2"]]
    old_batch = lvlm.batch_size
    lvlm.batch_size = 3  # three generation batches
    try:
        fast = FastScorer(lvlm)
        texts, lps = fast.generate_and_score(prompts, answers, 3)
        assert texts == lvlm.generate(prompts, 3)
        for p, a, got in zip(prompts, answers, lps):
            ref = lvlm.answer_logprob([p] * len(a), a)
            assert len(got) == len(a) and max(abs(x - r) for x, r in zip(got, ref)) < 1e-4
        assert fast.vision_forwards == 0  # the generation's prefill was the only prompt pass
    finally:
        lvlm.batch_size = old_batch


def test_the_zero_shot_prompt_shares_the_first_steps_header_group(setup):
    """The first beam step's call holds [query] and [ICD, query] prompts: both share only the
    system header, and they form one group (one prefix row), not one group each."""
    lvlm, q, y, pool = setup
    prompts = [[q]] + [[pool[c], q] for c in range(6)]
    fast = _compare(lvlm, prompts, [y] * len(prompts))
    groups = fast._groups([lvlm.encode(p, y) for p in prompts])
    assert len(groups) == 1 and sorted(groups[0][1]) == list(range(7))
    assert fast.forwards == 2  # the header once, then every suffix in one pass
