"""Online GRPO (grpo.rollout: online): the selector's own samples, judged by the real tiny LVLM.

Checked here on a few tiny-profile queries: a sampled sequence's reward is exactly what
generate-rl-data's judge gives the same sequence on its own; a repeated sequence is served by the
judged-sequence cache (no LVLM call, also for a new process reading the same store); a killed run
resumes to bit-identical weights while replaying its rewards from the cache; zero-variance groups
drop out of the loss exactly as in offline GRPO.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lever.models.prompting import icd_example, most_common_answer, query_example
from lever.rl.grpo import advantages_for, grpo_batch
from lever.rl.groups import GroupData, build_groups
from lever.rl.judge_cache import DirBackend, JudgeCache
from lever.rl.online import OnlineJudge, rollout, run_online_grpo
from lever.rl.rewards import plan_reward
from lever.rl.trainer import EpochRecorder
from lever.sampling.rl_data import judge as rl_judge
from lever.stages.sampling import make_scorer
from lever.selectors.pointer import build_selector

from lever_tiny_env import tiny_data, tiny_lvlm, tiny_plan

pytestmark = pytest.mark.slow

POOL = 12
SHOTS = 2


@pytest.fixture(scope="module")
def env():
    from lever.data.dataset import load_index
    from lever.stages.training import load_train_embeddings

    root = tiny_data()
    index = load_index(root / "prepare-data")
    emb = load_train_embeddings(root / "export-embeddings")
    plan = tiny_plan("grpo.rollout=online", "grpo.epochs=3", "grpo.batch_size=3", "grpo.lr=1e-2",
                     "grpo.online.group_size=4", "grpo.online.queries_per_epoch=6", "grpo.online.eval_queries=3",
                     "grpo.online.eval_samples=2", "grpo.updates_per_round=2")
    rng = np.random.default_rng(0)
    records = []
    for qid in range(10):  # planted and plain questions alike; pools without the query itself
        pool = [int(g) for g in rng.choice([g for g in range(len(index.train)) if g != qid], POOL, replace=False)]
        records.append({"query_id": qid, "pool": pool, "candidates": [
            {"positions": [0, 1], "correct": False, "acc_score": 0.0, "gt_prob": 0.0, "rel_score": 0.0}]})
    train = build_groups(records[:7], n_items=emb.size(0), reward_cfg=plan.reward)
    val = build_groups(records[7:], n_items=emb.size(0), reward_cfg=plan.reward)
    return plan, index, emb, train, val


def _judge(env, root) -> OnlineJudge:
    plan, index, *_ = env
    lvlm = tiny_lvlm()
    return OnlineJudge(lvlm, list(index.train), JudgeCache(DirBackend(root), "ns"), make_scorer(lvlm, plan.lvlm.fast))


def test_sampled_rewards_equal_the_judge_on_its_own_and_repeats_hit_the_cache(env, tmp_path):
    plan, index, emb, train, _ = env
    model = build_selector(emb.size(1), plan.selector, seed=1)
    judge = _judge(env, tmp_path)
    rnd = rollout(model, emb, train, torch.arange(3), plan.grpo.online, judge, plan.reward,
                  torch.Generator().manual_seed(5))
    data = rnd.data
    assert rnd.sampled == 12 and judge.new == rnd.unique and judge.cached == 0
    # every sampled sequence, judged again on its own (one prompt per call, a fresh scorer)
    lvlm = tiny_lvlm()
    checked = 0
    for i in range(3):
        rec = index.train[data.query_ids[i]]
        y = most_common_answer(rec.answers)
        scorer = make_scorer(lvlm, plan.lvlm.fast)
        p0 = scorer([[query_example(rec)]], [y])[0]
        for j in range(4):
            ids = [int(data.pool[i, p]) for p in data.seqs[i, j].tolist()]
            assert ids == [train.pool[i, p].item() for p in data.seqs[i, j].tolist()]
            alone = rl_judge(lvlm, [[icd_example(index.train[g]) for g in ids] + [query_example(rec)]],
                             list(rec.answers), y, p0, scorer)[0]
            assert float(data.rewards[i, j]) == plan_reward(alone, plan.reward)
            assert bool(data.correct[i, j]) == alone["correct"]
            cached = judge.cache.get(data.query_ids[i], ids)
            assert cached["pred_answer"] == alone["pred_answer"]
            assert math.isclose(cached["gt_prob"], alone["gt_prob"], rel_tol=1e-4, abs_tol=1e-6)
            checked += 1
    assert checked == 12
    # the same draws again: every judgement from the cache, no LVLM call
    judge.cache.flush()
    calls, new = judge.lvlm_calls(), judge.new
    again = rollout(model, emb, train, torch.arange(3), plan.grpo.online, judge, plan.reward,
                    torch.Generator().manual_seed(5))
    assert judge.lvlm_calls() == calls and judge.new == new and judge.cached == 12
    assert torch.equal(again.data.rewards, data.rewards)
    # and a new judge on the same store (another process, a resumed pod) reads them too
    other = _judge(env, tmp_path)
    rollout(model, emb, train, torch.arange(3), plan.grpo.online, other, plan.reward, torch.Generator().manual_seed(5))
    assert other.new == 0 and other.cached == 12 and other.lvlm_calls() == calls


def test_zero_variance_groups_are_excluded_from_the_loss(env):
    plan, _, emb, train, _ = env
    model = build_selector(emb.size(1), plan.selector, seed=2)
    ref = build_selector(emb.size(1), plan.selector, seed=3)
    sub = train.subset([0, 1, 2])
    seqs = torch.tensor([[[0, 1], [2, 3], [4, 5]], [[1, 0], [3, 2], [5, 4]], [[6, 7], [8, 9], [7, 6]]])
    rewards = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])  # group 1: zero variance
    data = GroupData(sub.query_ids, sub.query_idx, sub.pool, sub.pool_mask, seqs, torch.ones(3, 3, dtype=torch.bool),
                     rewards, rewards > 0)
    adv, active = advantages_for(data, plan.grpo)
    assert active.tolist() == [[True] * 3, [False] * 3, [True] * 3]
    assert torch.equal(adv[1], torch.zeros(3))
    full = grpo_batch(model, ref, None, emb, data, torch.arange(3), adv, active, plan.grpo, 0.1)
    keep = torch.tensor([0, 2])
    adv2, act2 = advantages_for(data.subset(keep), plan.grpo)
    without = grpo_batch(model, ref, None, emb, data.subset(keep), torch.arange(2), adv2, act2, plan.grpo, 0.1)
    assert torch.allclose(full.loss, without.loss, atol=1e-7)
    # a round made only of zero-variance groups takes no step
    flat = GroupData(data.query_ids, data.query_idx, data.pool, data.pool_mask, seqs, data.group_mask,
                     torch.ones(3, 3), torch.ones(3, 3, dtype=torch.bool))
    a3, act3 = advantages_for(flat, plan.grpo)
    assert grpo_batch(model, ref, None, emb, flat, torch.arange(3), a3, act3, plan.grpo, 0.1).loss is None


class _Killed(Exception):
    pass


def _train(env, out, cache_root, hooks=()):
    plan, _, emb, train, val = env
    model = build_selector(emb.size(1), plan.selector, seed=4)
    ref = build_selector(emb.size(1), plan.selector, seed=4)
    judge = _judge(env, cache_root)
    rec = EpochRecorder(out, on_epoch_end=list(hooks))
    rows, info = run_online_grpo(model, emb, train, val, plan.grpo, judge=judge, reward_cfg=plan.reward,
                                 epochs=plan.grpo.epochs, reference=ref, recorder=rec, seed=plan.seed,
                                 state_path=out / "grpo_state.safetensors", fingerprint="t")
    return model, rec, judge, info


def test_kill_and_resume_give_identical_weights_and_replay_the_rewards(env, tmp_path):
    straight, rec, judge, info = _train(env, tmp_path / "a", tmp_path / "cache_a")
    assert [r["epoch"] for r in rec.epochs] == [1, 2, 3]
    assert info["heldout_reward_start"] is not None
    row = rec.epochs[-1]
    assert row["rollout_sequences"] == 6 * 4  # a duplicate within a group is judged (or looked up) once
    assert row["judged_new"] + row["judged_cached"] == round(row["rollout_unique_frac"] * row["rollout_sequences"])
    assert 0.0 <= row["zero_std_frac"] <= 1.0 and row["lvlm_calls"] >= 0

    def kill_in_epoch_3(phase, epoch, metrics):
        if epoch == 3:
            raise _Killed()

    with pytest.raises(_Killed):
        _train(env, tmp_path / "b", tmp_path / "cache_b", [kill_in_epoch_3])
    resumed, rec_b, judge_b, info_b = _train(env, tmp_path / "b", tmp_path / "cache_b")
    assert [r["epoch"] for r in rec_b.epochs] == [1, 2, 3]
    assert judge_b.new == 0  # epoch 3 re-ran on the rewards the killed attempt had judged
    assert info_b == info
    for (k, v), (k2, v2) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    for a, b in zip(rec.epochs, rec_b.epochs):
        assert a["rollout_reward"] == b["rollout_reward"] and a["heldout_reward"] == b["heldout_reward"]
