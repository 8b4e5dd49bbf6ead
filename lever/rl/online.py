"""On-policy GRPO (``grpo.rollout: online``): the selector samples its own groups, the LVLM judges them.

Offline GRPO (:mod:`lever.rl.grpo`) optimises over candidates judged once before training; once
the policy leaves them, its PPO ratio weighs sequences it never sampled and k3 stops estimating a
KL.  Here every round takes ``grpo.batch_size`` training queries and

1. samples ``online.group_size`` sequences per query from the *current* selector (temperature
   ``online.temperature``; duplicates are kept: they are draws of the policy, so the group's
   reward mean and spread are the policy's; a repeated sequence is judged only once, through the
   cache), optionally adding a share of the query's offline RL-data candidates;
2. judges every (query, ICD sequence) not yet in the :class:`~lever.rl.judge_cache.JudgeCache`
   with the LVLM through generate-rl-data's own :func:`~lever.sampling.rl_data.judge` (verdict,
   acc_score, gt_prob, rel_score), and scores it with the plan's reward (``plan_reward``);
3. computes group advantages exactly as offline GRPO (zero-variance groups excluded from the
   loss), and takes ``grpo.updates_per_round`` PPO/KL steps on the round with the old policy =
   the sampling policy (the first step's ratio is exactly 1; later ones use a frozen copy taken
   at sampling time).

After every epoch the judged cache is flushed (before the resume state is written, so a resumed
run replays the same rewards), and the policy's own samples on held-out queries are judged:
``heldout_reward`` (mean reward of ``online.eval_samples`` samples per query) and
``heldout_greedy_reward``.  Those samples come from a generator seeded by the plan seed alone
(common random numbers): two epochs differ only because the policy changed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from lever.config.schema import GRPOConfig, OnlineRolloutConfig, RewardConfig
from lever.models.prompting import icd_example, most_common_answer, query_example
from lever.rl.advantage import zero_variance_groups
from lever.rl.grpo import (adapt_beta, advantages_for, frozen_copy, grpo_accumulator, grpo_batch, grpo_means, grpo_step,
                           set_trainable)
from lever.rl.groups import GroupData
from lever.rl.judge_cache import JudgeCache
from lever.rl.loop import EpochPhase, Loop, SaveFn, forked_seed, run_epochs
from lever.rl.resume import TrainState
from lever.rl.rewards import plan_reward
from lever.rl.trainer import EpochRecorder, mean, small_model_threads
from lever.rl.validation import evaluate
from lever.selectors.pointer import PointerSelector, greedy, sample_batch

log = logging.getLogger(__name__)
#: salt of the held-out sampling generator (independent of the training stream)
_HELDOUT_SALT = 7_919


@dataclass
class OnlineJudge:
    """Verdicts of (train item, ICD ids) through the LVLM, with the judged-sequence cache.

    ``index_train`` is the dataset's train split (global id -> record); ``scorer`` the scoring
    path generate-rl-data uses (``lever.stages.sampling.make_scorer``).
    """

    lvlm: Any
    index_train: list
    cache: JudgeCache
    scorer: Any = None
    max_new_tokens: Optional[int] = None
    new: int = 0
    cached: int = 0
    failed: int = 0
    seconds: float = 0.0

    def lvlm_calls(self) -> int:
        return int(getattr(self.lvlm, "calls", 0))

    def _p0(self, qid: int, rec: Any, y: str) -> float:
        p0 = self.cache.p0(qid)
        if p0 is None:
            from lever.models.answer_scores import answer_prob

            score = self.scorer or (lambda ps, ans: answer_prob(self.lvlm, ps, ans))
            p0 = float(score([[query_example(rec)]], [y])[0])
            self.cache.set_p0(qid, p0)
        return p0

    def verdicts(self, qid: int, seqs: list[tuple[int, ...]]) -> list[dict]:
        """One verdict per sequence (global ICD ids), in order; only sequences the cache lacks reach
        the LVLM, in one batched :func:`~lever.sampling.rl_data.judge` call."""
        from lever.sampling.rl_data import judge, reset_scorer

        t0 = time.monotonic()
        rec = self.index_train[qid]
        out: dict[tuple[int, ...], dict] = {}
        todo: list[tuple[int, ...]] = []
        for s in seqs:
            if s in out or s in todo:
                continue
            hit = self.cache.get(qid, s)
            if hit is not None:
                out[s] = hit
                self.cached += 1
            else:
                todo.append(s)
        if todo:
            reset_scorer(self.scorer)  # per-query scorer state starts empty, as in generate-rl-data
            y = most_common_answer(rec.answers)
            p0 = self._p0(qid, rec, y)
            query = query_example(rec)
            prompts = [[icd_example(self.index_train[g]) for g in s] + [query] for s in todo]
            for s, v in zip(todo, judge(self.lvlm, prompts, list(rec.answers), y, p0, self.scorer, self.max_new_tokens)):
                out[s] = v
                if v.get("eval_failed"):
                    self.failed += 1  # not cached: a failure may be transient
                else:
                    self.cache.put(qid, s, v)
                    self.new += 1
        self.seconds += time.monotonic() - t0
        return [out[s] for s in seqs]


@dataclass
class Round:
    """One round's groups (padded like offline GroupData) and what they cost."""

    data: GroupData
    sampled: int
    unique: int
    failed: int = 0
    offline: int = 0
    rewards: list[float] = field(default_factory=list)


def _icds(pool_row: torch.Tensor, positions: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(pool_row[p]) for p in positions.tolist())


def rollout(
    model: PointerSelector, emb: torch.Tensor, source: GroupData, qsel: torch.Tensor, ocfg: OnlineRolloutConfig, judge: OnlineJudge,
    reward_cfg: RewardConfig, gen: torch.Generator,
) -> Round:
    """Sample, judge and score the groups of the queries ``qsel`` of ``source`` (the offline groups:
    they give each query its pool and, with ``offline_fraction`` > 0, the candidates mixed in)."""
    dev = source.device
    qsel = qsel.to(dev)
    b, G, S = len(qsel), ocfg.group_size, source.shots
    seqs = sample_batch(model, emb[source.query_idx[qsel]], emb[source.pool[qsel]], S, G, ocfg.temperature, gen,
                        source.pool_mask[qsel])
    n_off = [0] * b
    off_pick: list[torch.Tensor] = []
    for i, q in enumerate(qsel.tolist()):
        have = int(source.group_mask[q].sum())
        k = int(round(ocfg.offline_fraction * have))
        pick = torch.randperm(have, generator=gen)[:k] if k else torch.zeros(0, dtype=torch.long)
        off_pick.append(pick)
        n_off[i] = k
    width = G + max(n_off)
    out_seqs = torch.zeros(b, width, S, dtype=torch.long)
    gmask = torch.zeros(b, width, dtype=torch.bool)
    rewards = torch.zeros(b, width)
    correct = torch.zeros(b, width, dtype=torch.bool)
    rnd = Round(source.subset(qsel), b * G, 0)
    for i, q in enumerate(qsel.tolist()):
        qid = int(source.query_ids[q])
        pool_row = source.pool[q].cpu()
        icds = [_icds(pool_row, seqs[i, j].cpu()) for j in range(G)]
        rnd.unique += len(set(icds))
        for j, (v, ids) in enumerate(zip(judge.verdicts(qid, icds), icds)):
            out_seqs[i, j] = seqs[i, j].cpu()
            if v.get("eval_failed"):
                rnd.failed += 1
                continue  # like offline data: a failed judgement is no candidate
            r = plan_reward({**v, "beam_score": 0.0}, reward_cfg)
            gmask[i, j], rewards[i, j], correct[i, j] = True, r, bool(v["correct"])
            rnd.rewards.append(r)
        real = source.group_mask[q].nonzero(as_tuple=True)[0]
        for t, p in enumerate(off_pick[i].tolist()):
            j = G + t
            out_seqs[i, j] = source.seqs[q, real[p]].cpu()
            gmask[i, j], rewards[i, j] = True, float(source.rewards[q, real[p]])
            correct[i, j] = bool(source.correct[q, real[p]])
            rnd.offline += 1
    d = rnd.data
    rnd.data = GroupData(d.query_ids, d.query_idx, d.pool, d.pool_mask, out_seqs.to(dev), gmask.to(dev),
                         rewards.to(dev), correct.to(dev))
    return rnd


@torch.no_grad()
def heldout_rewards(
    model: PointerSelector, emb: torch.Tensor, val: GroupData, judge: OnlineJudge, reward_cfg: RewardConfig, ocfg: OnlineRolloutConfig,
    seed: int,
) -> dict[str, Optional[float]]:
    """Mean reward (and share correct) of the policy's own samples and greedy sequence on held-out
    queries, judged by the LVLM (cached)."""
    n = len(val) if ocfg.eval_queries is None else min(ocfg.eval_queries, len(val))
    if n == 0:
        return {"heldout_reward": None, "heldout_correct": None, "heldout_greedy_reward": None}
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + _HELDOUT_SALT)
    qsel = torch.arange(n, device=val.device)
    q_emb, c_emb, mask = emb[val.query_idx[qsel]], emb[val.pool[qsel]], val.pool_mask[qsel]
    samples = sample_batch(model, q_emb, c_emb, val.shots, ocfg.eval_samples, ocfg.temperature, gen, mask).cpu()
    g = greedy(model, q_emb, c_emb, val.shots, mask).cpu()
    rs, cs, gr = [], [], []
    for i in range(n):
        qid, pool_row = int(val.query_ids[i]), val.pool[i].cpu()
        icds = [_icds(pool_row, samples[i, j]) for j in range(ocfg.eval_samples)] + [_icds(pool_row, g[i])]
        vs = judge.verdicts(qid, icds)
        for v in vs[:-1]:
            if not v.get("eval_failed"):
                rs.append(plan_reward({**v, "beam_score": 0.0}, reward_cfg))
                cs.append(1.0 if v["correct"] else 0.0)
        if not vs[-1].get("eval_failed"):
            gr.append(plan_reward({**vs[-1], "beam_score": 0.0}, reward_cfg))
    return {"heldout_reward": mean(rs), "heldout_correct": mean(cs), "heldout_greedy_reward": mean(gr)}


@small_model_threads
def run_online_grpo(
    model: PointerSelector,
    emb: torch.Tensor,
    train: GroupData,
    val: GroupData,
    cfg: GRPOConfig,
    *,
    judge: OnlineJudge,
    reward_cfg: RewardConfig,
    epochs: int,
    reference: Optional[PointerSelector],
    recorder: EpochRecorder,
    save: Optional[SaveFn] = None,
    seed: int = 0,
    state_path: Optional[Path] = None,
    fingerprint: str = "",
    phase: str = "grpo",
) -> tuple[list[dict], dict]:
    """Train ``model`` in place with online rollouts for ``epochs`` (GRPOConfig ``cfg``).  Returns
    (this call's rows, info: the held-out reward of the starting policy).  With ``state_path`` a
    killed attempt resumes after its last finished epoch with the same weights, AdamW state,
    generator and beta; the judged cache replays its rewards."""
    if epochs == 0 or len(train) == 0:
        return [], {}
    with forked_seed(seed):
        model.eval()  # dropout off for sampling and every log-prob
        params = set_trainable(model, cfg.freeze_backbone)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        loop = Loop(model, params, opt, torch.Generator().manual_seed(seed), recorder, phase, cfg.grad_clip)
        online = _OnlinePhase(model, emb, train, val, cfg, judge, reward_cfg, reference, seed)
        res = run_epochs(online, loop, first_epoch=1, last_epoch=epochs, save=save, state_path=state_path,
                         fingerprint=fingerprint)
        return res.rows, online.info


class _OnlinePhase(EpochPhase):
    """One online GRPO epoch: rounds of rollout, judging and PPO/KL updates; carries beta and the
    held-out reward of the starting policy (``info``)."""

    def __init__(self, model: PointerSelector, emb: torch.Tensor, train: GroupData, val: GroupData, cfg: GRPOConfig,
                 judge: OnlineJudge, reward_cfg: RewardConfig, reference: Optional[PointerSelector], seed: int) -> None:
        self.model, self.emb, self.train, self.val, self.cfg = model, emb, train, val, cfg
        self.judge, self.reward_cfg, self.seed, self.ocfg = judge, reward_cfg, seed, cfg.online
        self.use_kl = reference is not None
        self.ref = reference if reference is not None else frozen_copy(model)
        self.beta = cfg.kl_beta
        n = len(train)
        self.per_epoch = n if self.ocfg.queries_per_epoch is None else min(self.ocfg.queries_per_epoch, n)
        self.rounds = (self.per_epoch + cfg.batch_size - 1) // cfg.batch_size
        self.info: dict = {}
        self._judged = (0, 0)  # (LVLM calls, newly judged) when the epoch's training ended

    def restore_fields(self, state: TrainState) -> None:
        self.beta = float(state.beta) if state.beta is not None else self.beta
        self.info = dict(state.extra)

    def resume_fields(self) -> dict:
        return {"beta": self.beta, "extra": self.info}

    def begin(self, loop: Loop) -> None:
        if "heldout_reward_start" not in self.info:  # the starting policy, for the "did it rise" comparison
            h0 = heldout_rewards(self.model, self.emb, self.val, self.judge, self.reward_cfg, self.ocfg, self.seed)
            self.judge.cache.flush()
            self.info = {"heldout_reward_start": h0["heldout_reward"], "heldout_correct_start": h0["heldout_correct"],
                         "heldout_greedy_reward_start": h0["heldout_greedy_reward"]}

    def train_epoch(self, loop: Loop, epoch: int) -> dict:
        cfg, judge = self.cfg, self.judge
        calls0, new0, cached0, judge_s0 = judge.lvlm_calls(), judge.new, judge.cached, judge.seconds
        opt_s = 0.0
        order = torch.randperm(len(self.train), generator=loop.gen)[:self.per_epoch]
        acc = grpo_accumulator()
        rewards: list[float] = []
        zero = groups = skipped = sampled = unique = offline = failed = 0
        adv_seen: list[torch.Tensor] = []
        bar = loop.progress(self.rounds, f"{loop.phase} online epoch {epoch}")
        for i in bar:
            qsel = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            rnd = rollout(self.model, self.emb, self.train, qsel, self.ocfg, judge, self.reward_cfg, loop.gen)
            t0 = time.monotonic()
            data = rnd.data
            rewards += rnd.rewards
            sampled, unique, offline, failed = sampled + rnd.sampled, unique + rnd.unique, offline + rnd.offline, failed + rnd.failed
            rq, rg = data.rows()
            zv = zero_variance_groups(data.rewards[rq, rg], rq)
            real_groups = torch.unique(rq)
            groups += len(real_groups)
            zero += int(sum(bool(zv[rq == g].all()) for g in real_groups))
            adv, active = advantages_for(data, cfg)
            adv_seen.append(adv[rq, rg])
            old = frozen_copy(self.model) if cfg.updates_per_round > 1 else None
            local = torch.arange(len(data), device=data.device)
            for u in range(cfg.updates_per_round):
                bt = grpo_batch(self.model, self.ref, None if u == 0 else old, self.emb, data, local, adv, active, cfg,
                                self.beta if self.use_kl else 0.0)
                if bt.loss is None:  # every group of the round had zero reward variance
                    skipped += 1
                    loop.step += 1
                    break
                grpo_step(loop, epoch, bt, acc, self.beta, {"reward": mean(rnd.rewards)})
                loop.step += 1
            opt_s += time.monotonic() - t0
            bar.set_postfix(reward=f"{mean(rewards) or 0:.3f}")
        judge_s = judge.seconds - judge_s0
        calls1, new1, cached1 = judge.lvlm_calls(), judge.new, judge.cached
        self._judged = (calls1, new1)
        a = torch.cat(adv_seen) if adv_seen else torch.zeros(0)
        r = torch.tensor(rewards) if rewards else torch.zeros(0)
        return {
            **grpo_means(acc), "adv_std": float(a.std()) if a.numel() > 1 else 0.0,
            "adv_max": float(a.abs().max()) if a.numel() else 0.0, "beta": self.beta if self.use_kl else 0.0,
            "reward_mean": float(r.mean()) if r.numel() else None,
            "reward_std": float(r.std()) if r.numel() > 1 else None,
            "zero_std_frac": zero / groups if groups else None, "skipped_steps": skipped,
            "rollout": "online", "rollout_reward": float(r.mean()) if r.numel() else None,
            "rollout_sequences": sampled, "rollout_unique_frac": unique / sampled if sampled else None,
            "rollout_offline": offline, "judge_failed": failed,
            "judged_new": new1 - new0, "judged_cached": cached1 - cached0, "lvlm_calls": calls1 - calls0,
            "judge_seconds": round(judge_s, 3), "optimize_seconds": round(opt_s, 3),
        }

    def evaluate(self, loop: Loop, epoch: int) -> dict:
        judge, (calls1, new1) = self.judge, self._judged
        t0 = time.monotonic()
        held = heldout_rewards(self.model, self.emb, self.val, judge, self.reward_cfg, self.ocfg, self.seed)
        judge.cache.flush()  # before the resume state: a resumed run replays these rewards
        eval_s = time.monotonic() - t0
        return {**evaluate(self.model, self.emb, self.val), **held,
                "heldout_judged_new": judge.new - new1, "heldout_lvlm_calls": judge.lvlm_calls() - calls1,
                "heldout_seconds": round(eval_s, 3)}

    def end_epoch(self, row: dict) -> None:
        self.beta = adapt_beta(self.beta, row, self.cfg, self.use_kl)
