"""RCE and GRPO loops: exact first step, batching equals a per-group loop, measured learning."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from lever.config.schema import GRPOConfig, RCEConfig, RewardConfig, SelectorConfig
from lever.rl.grpo import advantages_for, frozen_copy, grpo_batch, run_grpo
from lever.rl.groups import batch_step_logprobs, build_groups, scatter_rows
from lever.rl.losses import rce_loss
from lever.rl.rce import run_rce, tau_at
from rl_synthetic import make_rl_records, synthetic_embeddings
from lever.rl.trainer import EpochRecorder, NonFiniteError
from lever.rl.validation import evaluate, split_records
from lever.selectors.pointer import gather_sequence, build_selector


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: intra-op threads only add contention on the shared CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

N_ITEMS, DIM = 160, 16


@pytest.fixture(scope="module")
def data():
    emb, u = synthetic_embeddings(N_ITEMS, DIM, 0)
    recs = make_rl_records(emb, u, query_ids=list(range(120)), group_sizes=(4, 16), seed=1)
    tr, va = split_records(recs, 0.25)
    rc = RewardConfig()
    return emb, build_groups(tr, n_items=N_ITEMS, reward_cfg=rc), build_groups(va, n_items=N_ITEMS, reward_cfg=rc)


def _model(seed=0, dropout=0.1):
    return build_selector(DIM, SelectorConfig(hidden=32, dropout=dropout), seed=seed)


def _rec(tmp_path, hooks=None):
    return EpochRecorder(tmp_path, on_epoch_end=hooks, console=Console(file=io.StringIO()))


def test_split_is_by_sorted_query_id():
    recs = [{"query_id": q, "candidates": []} for q in [9, 1, 5, 3, 7, 2, 8, 4, 6, 0]]
    tr, va = split_records(recs, 0.2)
    assert [r["query_id"] for r in tr] == list(range(8)) and [r["query_id"] for r in va] == [8, 9]


def test_tau_schedule_is_linear_over_all_steps():
    assert [tau_at(s, 5, 2.0, 0.5) for s in range(5)] == pytest.approx([2.0, 1.625, 1.25, 0.875, 0.5])
    assert tau_at(0, 1, 2.0, 0.5) == 2.0


def test_first_grpo_step_has_ratio_one_and_zero_kl_and_rounds_refresh_the_old_policy(data, tmp_path):
    emb, train, val = data
    m = _model()
    cfg = GRPOConfig(epochs=1, lr=1e-2, batch_size=8, updates_per_round=3, rank_advantage=False, kl_beta=0.1,
                     freeze_backbone=False)
    rec = _rec(tmp_path)
    run_grpo(m, emb, train, val, cfg, epochs=1, reference=frozen_copy(m), recorder=rec)
    s = rec.steps
    assert s[0]["ratio_min"] == 1.0 and s[0]["ratio_max"] == 1.0
    assert s[0]["kl_k3"] == 0.0 and s[0]["kl_exact"] == 0.0
    # inside a round the old policy is the frozen start-of-round copy: ratio moves away from 1 ...
    assert s[1]["ratio_max"] > 1.0 or s[1]["ratio_min"] < 1.0
    # ... and a new round (step 3) starts again from ratio exactly 1 while KL to the reference stays > 0
    assert s[3]["ratio_min"] == 1.0 and s[3]["ratio_max"] == 1.0 and s[3]["kl_exact"] > 0


def _variable_groups():
    emb, u = synthetic_embeddings(200, DIM, 3)
    recs = make_rl_records(emb, u, query_ids=list(range(40)), pool_size=12, group_sizes=(1, 1), seed=4)
    # resize: query i gets a group of size i+1 (1..40), duplicates removed by construction
    big = make_rl_records(emb, u, query_ids=list(range(40)), pool_size=12, group_sizes=(40, 40), seed=4)
    for i, (r, b) in enumerate(zip(recs, big)):
        r["candidates"] = b["candidates"][: i + 1]
    return emb, build_groups(recs, n_items=200, reward_cfg=RewardConfig())


@pytest.mark.parametrize("rank", [True, False])
@pytest.mark.parametrize("estimator", ["k3", "exact"])
def test_grpo_loss_with_group_sizes_1_to_40_equals_a_per_group_loop(rank, estimator):
    emb, g = _variable_groups()
    assert sorted(int(x) for x in g.group_mask.sum(-1)) == list(range(1, 41))
    policy, old, ref = _model(0).eval(), _model(1).eval(), _model(2).eval()
    cfg = GRPOConfig(rank_advantage=rank, kl_estimator=estimator, clip_eps=0.2)
    adv, active = advantages_for(g, cfg)
    qsel = torch.randperm(len(g), generator=torch.Generator().manual_seed(0))
    batched = grpo_batch(policy, ref, old, emb, g, qsel, adv, active, cfg, beta=0.3)
    total, n_active = 0.0, 0
    for q in qsel.tolist():
        one = grpo_batch(policy, ref, old, emb, g, torch.tensor([q]), adv, active, cfg, beta=0.3)
        if one.loss is None:
            continue
        k = int(one.active.sum())
        total += float(one.loss.detach()) * k  # per-group mean * rows = per-group sum
        n_active += k
    assert int(batched.active.sum()) == n_active
    assert float(batched.loss.detach()) == pytest.approx(total / n_active, rel=1e-5, abs=1e-6)


def test_rce_loss_batched_equals_per_group_loop():
    emb, g = _variable_groups()
    m = _model().eval()
    qsel = torch.arange(len(g))
    step_lp, seqs, rq, rg = batch_step_logprobs(m, emb, g, qsel)
    logp = scatter_rows(gather_sequence(step_lp, seqs), rq, rg, tuple(g.group_mask.shape))
    batched = float(rce_loss(logp, g.rewards, g.group_mask, 0.7).detach())
    per = []
    for q in range(len(g)):
        n = int(g.group_mask[q].sum())
        lp = torch.stack([gather_sequence(batch_step_logprobs(m, emb, g, torch.tensor([q]))[0], g.seqs[q, :n])])
        w = torch.softmax(g.rewards[q, :n] / 0.7, 0)
        per.append(float((w * -lp[0]).sum().detach()))
    assert batched == pytest.approx(sum(per) / len(per), rel=1e-5)


def test_rce_then_grpo_learn_the_best_candidate_on_held_out_groups(data, tmp_path):
    emb, train, val = data
    m = _model(seed=0)
    before = evaluate(m, emb, val)
    run_rce(m, emb, train, val, RCEConfig(epochs=6, lr=3e-3, batch_size=16), recorder=_rec(tmp_path / "r"))
    after_rce = evaluate(m, emb, val)
    # RCE: the policy's top candidate within each held-out group is a best-reward one far above chance
    assert after_rce["val_group_top1"] >= after_rce["val_group_chance"] + 0.3
    assert after_rce["val_group_top1"] > before["val_group_top1"] + 0.2
    assert after_rce["val_reward"] > before["val_reward"] + 0.2
    cfg = GRPOConfig(epochs=8, lr=2e-3, rank_advantage=False, kl_beta=0.05, freeze_backbone=True, batch_size=16)
    rows, _, _ = run_grpo(m, emb, train, val, cfg, epochs=8, reference=frozen_copy(m), recorder=_rec(tmp_path / "g"))
    after = evaluate(m, emb, val)
    assert after["val_reward"] > after_rce["val_reward"] + 0.1
    assert rows[-1]["adv_std"] > 0.3 and rows[-1]["kl_exact"] > 0


def test_freeze_backbone_trains_only_the_scoring_layers(data, tmp_path):
    emb, train, val = data
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = GRPOConfig(epochs=1, lr=1e-2, rank_advantage=False, kl_beta=0.0, freeze_backbone=True)
    run_grpo(m, emb, train, val, cfg, epochs=1, reference=frozen_copy(m), recorder=_rec(tmp_path))
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("score_q.", "score_c.")) for k in changed)


def test_adaptive_beta_moves_by_the_factor(data, tmp_path):
    emb, train, val = data
    m = _model()
    cfg = GRPOConfig(epochs=3, lr=1e-2, kl_beta=0.1, rank_advantage=False, kl_estimator="exact",
                     adaptive_beta={"enabled": True, "kl_low": -1.0, "kl_high": 0.0, "factor": 1.5})
    rows, beta, _ = run_grpo(m, emb, train, val, cfg, epochs=3, reference=frozen_copy(m), recorder=_rec(tmp_path))
    assert [r["beta"] for r in rows] == pytest.approx([0.1, 0.15, 0.225])
    assert beta == pytest.approx(0.3375)


def test_non_finite_loss_stops_with_epoch_and_step(data, tmp_path):
    emb, train, val = data
    m = _model()
    with torch.no_grad():
        m.score_q.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"rce: non-finite loss .* at epoch 1, step 0"):
        run_rce(m, emb, train, val, RCEConfig(epochs=2), recorder=_rec(tmp_path))


def test_epoch_hook_stops_training_and_writes_stopped_json(data, tmp_path):
    emb, train, val = data
    m = _model()
    seen = []

    def hook(phase, epoch, metrics):
        seen.append((phase, epoch, sorted(metrics)))
        return "val loss rising" if epoch == 2 else None

    saved = []
    rows = run_rce(m, emb, train, val, RCEConfig(epochs=5, batch_size=32), recorder=_rec(tmp_path, [hook]),
                   save=lambda model, e, row: saved.append(e))
    assert len(rows) == 2 and saved == [1, 2] and seen[0][:2] == ("rce", 1)
    for key in ("train_loss", "val_loss", "val_reward", "kl_k3", "adv_std", "grad_norm", "entropy"):
        assert key in seen[0][2]
    assert json.loads((tmp_path / "stopped.json").read_text()) == {"phase": "rce", "epoch": 2, "reason": "val loss rising"}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_non_finite_metrics_are_written_as_null_and_listed(tmp_path):
    rec = _rec(tmp_path)
    seen = []
    rec.hooks.append(lambda phase, epoch, m: seen.append(m["kl_k3"]))
    rec.epoch("grpo", 1, {"kl_k3": float("inf"), "val_loss": 1.0})
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["kl_k3"] is None and row["nonfinite"] == ["kl_k3"] and row["val_loss"] == 1.0
    assert seen == [float("inf")]  # hooks (the divergence guard) still see the raw value


def _hand_groups(outcomes: list[list[tuple[bool, float]]]):
    emb, u = synthetic_embeddings(60, DIM, 0)
    recs = make_rl_records(emb, u, query_ids=list(range(len(outcomes))), pool_size=8, group_sizes=(6, 6), seed=0)
    for r, outs in zip(recs, outcomes):
        r["candidates"] = r["candidates"][: len(outs)]
        for c, (ok, acc) in zip(r["candidates"], outs):
            c["correct"], c["acc_score"] = ok, acc
    return emb, build_groups(recs, n_items=60, reward_cfg=RewardConfig())


def test_curriculum_buckets_hand_worked():
    from lever.config.schema import CurriculumConfig
    from lever.rl.curriculum import phase1_indices, positive_indices, quality_buckets

    _, g = _hand_groups([
        [(True, 1.0)] * 3 + [(False, 0.0)] * 3,  # gap 2.0, 3 pos / 3 neg -> high
        [(True, 0.3)] * 2 + [(False, 0.0)] * 2,  # gap 1.3, 2 / 2 -> medium
        [(True, 1.0)] * 3 + [(False, 0.3)] * 3,  # gap 2.0 - 0.3 = 1.7 >= 1.5, 3 / 3 -> high
        [(True, 1.0)] + [(False, 0.0)] * 5,  # one positive -> low
        [(False, 0.0)] * 4,  # no positive, zero variance -> low
    ])
    buckets = quality_buckets(g, CurriculumConfig())
    assert buckets == ["high", "medium", "high", "low", "low"]
    assert phase1_indices(g, CurriculumConfig()).tolist() == [0, 1, 2]
    assert positive_indices(g).tolist() == [0, 1, 2, 3]


def test_reference_none_drops_the_kl_term_but_still_reports_kl(data, tmp_path):
    emb, train, val = data
    m = _model()
    cfg = GRPOConfig(epochs=2, lr=1e-2, kl_beta=0.5, rank_advantage=False, freeze_backbone=False)
    rows, _, _ = run_grpo(m, emb, train, val, cfg, epochs=2, reference=None, recorder=_rec(tmp_path))
    assert all(r["beta"] == 0.0 for r in rows)
    assert rows[-1]["kl_exact"] > 0  # measured against the starting policy
    # with no KL term the loss is the PPO loss alone
    assert rows[0]["train_loss"] == pytest.approx(rows[0]["ppo_loss"], abs=1e-7)
