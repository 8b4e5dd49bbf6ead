"""The cost model counts what the scoring paths really feed (checked on the tiny model)."""

from __future__ import annotations

import math
import random

from lever_tiny_env import tiny_lvlm


def test_beam_cost_model_matches_a_real_beam_search(tmp_path):
    from lever.bench.cost_model import beam_costs, measure_lengths
    from lever.models.prompting import icd_example, most_common_answer, query_example
    from lever.bench.scoring import _synthetic_records
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
    from lever.bench.cost_model import Lengths, cost_table

    L = Lengths(header=14, icd=14, query=13, tail=5, answer=1, distinct_answers=2)
    rows = cost_table(L, img=256)
    infer = [r for r in rows if r.stage == "infer"]
    assert [r.plain_images for r in infer] == [2, 3, 4, 5]
    assert all(r.plain_tokens == r.fast_tokens for r in infer)  # batching changes throughput, not tokens
    assert all(r.plain_tokens > r.fast_tokens for r in rows if r.stage != "infer")


def test_cluster_fanout_is_the_cost_models_choice_and_keeps_loading_small():
    """The cluster profile's shards and units per pod are what the cost model suggests (so they
    cannot drift from it silently), and with them no LVLM stage spends more of a pod's time
    loading than the old fan-out did (48 infer pods, each ~90% load)."""
    from lever.config import load_plan
    from lever.bench.cost_model import PodAssumptions, pod_table, suggest_fanout

    plan = load_plan("plan5", "cluster")
    chosen = {"beam.shards": plan.beam.shards, "rl_data.shards": plan.rl_data.shards,
              "infer.shards": plan.infer.shards, "infer.units_per_pod": plan.infer.units_per_pod}
    assert chosen == suggest_fanout(plan)
    old = load_plan("plan5", "cluster", ["beam.shards=8", "rl_data.shards=8", "infer.shards=4", "infer.units_per_pod=1"])
    new_rows = {r.stage: r for r in pod_table(plan)}
    old_rows = {r.stage: r for r in pod_table(old)}
    assert old_rows["infer"].pods == 48 and old_rows["infer"].share > 0.8
    assert new_rows["infer"].pods == 1 and new_rows["infer"].share < old_rows["infer"].share / 2
    A = PodAssumptions()
    for stage in ("generate-beams", "generate-rl-data"):
        assert new_rows[stage].share <= A.target_share + 1e-9, stage
        assert new_rows[stage].pods <= A.max_pods
    # the rule itself: a slower model volume means fewer, longer pods
    slow = suggest_fanout(plan, A=PodAssumptions(read_gb_s=0.05))
    assert slow["rl_data.shards"] < chosen["rl_data.shards"]


def test_infer_units_per_pod_groups_units_without_changing_keys():
    from lever.config import load_plan
    from lever.pipeline.graph import pod_groups, stage
    from lever.pipeline.hashing import plan_keys

    a = load_plan("plan5", "cluster")
    b = load_plan("plan5", "cluster", ["infer.units_per_pod=5"])
    groups = pod_groups(stage("infer"), b)
    assert [len(g) for g in groups] == [5, 5, 2]
    assert [u for g in groups for u in g] == stage("infer").units(b)
    assert plan_keys(a).units["infer"] == plan_keys(b).units["infer"]  # how pods are cut is not content
