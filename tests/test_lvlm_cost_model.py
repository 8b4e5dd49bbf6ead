"""The cost model counts what the scoring paths really feed (checked on the tiny model)."""

from __future__ import annotations

import math
import random

from lever_tiny_env import tiny_lvlm


def test_beam_cost_model_matches_a_real_beam_search(tmp_path):
    from lever.models.cost_model import beam_costs, measure_lengths
    from lever.models.prompting import icd_example, most_common_answer, query_example
    from lever.models.scoring_bench import _synthetic_records
    from lever.sampling.beam_search import infoscore_beam_search

    lvlm = tiny_lvlm()
    records = _synthetic_records(40, 56, 0, tmp_path)
    K, B, S = 12, 3, 2
    prompts: list = []

    def recording(ps, ans):
        prompts.extend(lvlm.encode(p, a) for p, a in zip(ps, ans))
        return [math.exp(x) for x in lvlm.answer_logprob(ps, ans)]

    rng = random.Random(0)
    pool = [icd_example(records[i]) for i in rng.sample(range(1, 40), K)]
    infoscore_beam_search(recording, query_example(records[0]), most_common_answer(records[0].answers), pool, B, S)
    cost = beam_costs(measure_lengths(lvlm, records), img=4, K=K, B=B, S=S)
    fed = sum(len(e.ids) for e in prompts)
    assert len(prompts) == 1 + K + B * (K - 1)
    assert cost.plain_images == sum(len(e.images) for e in prompts)
    assert abs(cost.plain_tokens - fed) / fed < 0.1  # averages of part lengths, not exact
    assert cost.fast_tokens < cost.plain_tokens and cost.fast_images == K + 1


def test_rl_and_infer_costs_are_consistent():
    from lever.models.cost_model import Lengths, cost_table

    L = Lengths(header=14, icd=14, query=13, tail=5, answer=1, distinct_answers=2)
    rows = cost_table(L, img=256)
    infer = [r for r in rows if r.stage == "infer"]
    assert [r.plain_images for r in infer] == [2, 3, 4, 5]
    assert all(r.plain_tokens == r.fast_tokens for r in infer)  # batching changes throughput, not tokens
    assert all(r.plain_tokens > r.fast_tokens for r in rows if r.stage != "infer")
