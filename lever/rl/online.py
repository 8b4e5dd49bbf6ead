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
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from lever.config.schema import GRPOConfig, OnlineRolloutConfig, RewardConfig
from lever.models.prompting import icd_example, most_common_answer, query_example
from lever.rl.advantage import zero_variance_groups
from lever.rl.grpo import advantages_for, frozen_copy, grpo_batch, set_trainable
from lever.rl.groups import GroupData
from lever.rl.judge_cache import JudgeCache
from lever.rl.resume import load_state, restore, save_state
from lever.rl.rewards import plan_reward
from lever.rl.trainer import EpochRecorder, check_finite, clip_and_check, mean, small_model_threads
from lever.rl.validation import evaluate
from lever.selectors.pointer import PointerSelector, greedy, sample_batch

log = logging.getLogger(__name__)

SaveFn = Callable[[PointerSelector, int, dict], None]
#: salt of the held-out sampling generator (independent of the training stream)
_HELDOUT_SALT = 7_919


@dataclass
class OnlineJudge:
    """Verdicts of (train item, ICD ids) through the LVLM, with the judged-sequence cache.

    ``index_train`` is the dataset's train split (global id -> record); ``scorer`` the scoring
    path generate-rl-data uses (``lever.sampling.stages.make_scorer``).
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
        from lever.sampling.rl_data import judge
        from lever.sampling.stages import _reset

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
            _reset(self.scorer)  # per-query scorer state starts empty, as in generate-rl-data
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _online_epochs(model, emb, train, val, cfg, judge=judge, reward_cfg=reward_cfg, epochs=epochs,
                              reference=reference, recorder=recorder, save=save, seed=seed, state_path=state_path,
                              fingerprint=fingerprint, phase=phase)


def _online_epochs(
    model: PointerSelector, emb: torch.Tensor, train: GroupData, val: GroupData, cfg: GRPOConfig, *, judge: OnlineJudge,
    reward_cfg: RewardConfig, epochs: int, reference: Optional[PointerSelector], recorder: EpochRecorder,
    save: Optional[SaveFn], seed: int, state_path: Optional[Path], fingerprint: str, phase: str,
) -> tuple[list[dict], dict]:
    ocfg = cfg.online
    model.eval()  # dropout off for sampling and every log-prob
    params = set_trainable(model, cfg.freeze_backbone)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    use_kl = reference is not None
    ref = reference if reference is not None else frozen_copy(model)
    beta = cfg.kl_beta
    gen = torch.Generator().manual_seed(seed)
    per_epoch = len(train) if ocfg.queries_per_epoch is None else min(ocfg.queries_per_epoch, len(train))
    rounds = (per_epoch + cfg.batch_size - 1) // cfg.batch_size
    global_step, first = 0, 1
    info: dict = {}
    st = load_state(state_path, fingerprint) if state_path is not None else None
    if st is not None:
        restore(st, model, opt, gen)
        first, global_step = st.epoch + 1, st.global_step
        beta = float(st.beta) if st.beta is not None else beta
        info = dict(st.extra)
        recorder.restore(st.epoch)
    rows: list[dict] = []
    if recorder.stopped is not None:
        return rows, info
    if "heldout_reward_start" not in info:  # the starting policy, for the "did it rise" comparison
        h0 = heldout_rewards(model, emb, val, judge, reward_cfg, ocfg, seed)
        judge.cache.flush()
        info = {"heldout_reward_start": h0["heldout_reward"], "heldout_correct_start": h0["heldout_correct"],
                "heldout_greedy_reward_start": h0["heldout_greedy_reward"]}
    for epoch in range(first, epochs + 1):
        calls0, new0, cached0, judge_s0 = judge.lvlm_calls(), judge.new, judge.cached, judge.seconds
        opt_s = 0.0
        order = torch.randperm(len(train), generator=gen)[:per_epoch]
        acc: dict[str, list[float]] = {k: [] for k in ("loss", "ppo", "k3", "exact", "clip", "ent", "gn")}
        rewards: list[float] = []
        zero = groups = skipped = sampled = unique = offline = failed = 0
        adv_seen: list[torch.Tensor] = []
        bar = tqdm(range(rounds), desc=f"{phase} online epoch {epoch}", leave=False, disable=None)
        for i in bar:
            qsel = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            rnd = rollout(model, emb, train, qsel, ocfg, judge, reward_cfg, gen)
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
            old = frozen_copy(model) if cfg.updates_per_round > 1 else None
            local = torch.arange(len(data), device=data.device)
            for u in range(cfg.updates_per_round):
                bt = grpo_batch(model, ref, None if u == 0 else old, emb, data, local, adv, active, cfg,
                                beta if use_kl else 0.0)
                if bt.loss is None:  # every group of the round had zero reward variance
                    skipped += 1
                    global_step += 1
                    break
                lv = check_finite(bt.loss, "loss", phase, epoch, global_step)
                opt.zero_grad(set_to_none=True)
                bt.loss.backward()
                gn = clip_and_check(params, cfg.grad_clip, phase, epoch, global_step)
                opt.step()
                act = bt.active
                k3v, exv = float(bt.k3.detach()[act].mean()), float(bt.exact.detach()[act].mean())
                cf = float(bt.clipped[act].float().mean())
                for k, v in (("loss", lv), ("ppo", float(bt.ppo.detach())), ("k3", k3v), ("exact", exv), ("clip", cf),
                             ("ent", bt.entropy), ("gn", gn)):
                    acc[k].append(v)
                recorder.step(phase, global_step, {
                    "epoch": epoch, "loss": lv, "ppo_loss": float(bt.ppo.detach()), "kl_k3": k3v, "kl_exact": exv,
                    "clip_frac": cf, "grad_norm": gn, "beta": beta, "reward": mean(rnd.rewards),
                    "ratio_min": float(bt.ratio.min()), "ratio_max": float(bt.ratio.max())})
                global_step += 1
            opt_s += time.monotonic() - t0
            bar.set_postfix(reward=f"{mean(rewards) or 0:.3f}")
        judge_s = judge.seconds - judge_s0
        calls1, new1, cached1 = judge.lvlm_calls(), judge.new, judge.cached
        t0 = time.monotonic()
        held = heldout_rewards(model, emb, val, judge, reward_cfg, ocfg, seed)
        judge.cache.flush()  # before the resume state: a resumed run replays these rewards
        eval_s = time.monotonic() - t0
        v = evaluate(model, emb, val)
        a = torch.cat(adv_seen) if adv_seen else torch.zeros(0)
        r = torch.tensor(rewards) if rewards else torch.zeros(0)
        row = {
            "train_loss": mean(acc["loss"]), **v, "ppo_loss": mean(acc["ppo"]), "kl_k3": mean(acc["k3"]),
            "kl_exact": mean(acc["exact"]), "adv_std": float(a.std()) if a.numel() > 1 else 0.0,
            "adv_max": float(a.abs().max()) if a.numel() else 0.0, "beta": beta if use_kl else 0.0,
            "reward_mean": float(r.mean()) if r.numel() else None,
            "reward_std": float(r.std()) if r.numel() > 1 else None,
            "zero_std_frac": zero / groups if groups else None, "clip_frac": mean(acc["clip"]),
            "entropy": mean(acc["ent"]), "grad_norm": mean(acc["gn"]), "skipped_steps": skipped,
            "rollout": "online", **held,
            "rollout_reward": float(r.mean()) if r.numel() else None,
            "rollout_sequences": sampled, "rollout_unique_frac": unique / sampled if sampled else None,
            "rollout_offline": offline, "judge_failed": failed,
            "judged_new": new1 - new0, "judged_cached": cached1 - cached0, "lvlm_calls": calls1 - calls0,
            "judge_seconds": round(judge_s, 3), "optimize_seconds": round(opt_s, 3),
            "heldout_judged_new": judge.new - new1, "heldout_lvlm_calls": judge.lvlm_calls() - calls1,
            "heldout_seconds": round(eval_s, 3),
        }
        if save is not None:
            save(model, epoch, row)
        rows.append(row)
        if use_kl and cfg.adaptive_beta.enabled and beta > 0:
            kl_used = row["kl_k3"] if cfg.kl_estimator == "k3" else row["kl_exact"]
            if kl_used is not None and kl_used > cfg.adaptive_beta.kl_high:
                beta *= cfg.adaptive_beta.factor
            elif kl_used is not None and kl_used < cfg.adaptive_beta.kl_low:
                beta /= cfg.adaptive_beta.factor
        stop = recorder.epoch(phase, epoch, row)
        if state_path is not None:
            save_state(state_path, model=model, opt=opt, gen=gen, epoch=epoch, global_step=global_step,
                       fingerprint=fingerprint, beta=beta, extra=info)
        if stop:
            break
    return rows, info
