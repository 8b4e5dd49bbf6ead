"""GRPO for the pointer selector (SPEC section 4), fixing what the seeds' diagnosis found.

Per query group: advantages by rank or z-score (:func:`~lever.rl.advantage.group_advantages`);
rows of zero-variance groups are excluded from the loss mean.  Per row:
``ppo = -min(ratio*A, clip(ratio, 1-eps, 1+eps)*A)``, ratio = exp(clamp(logp - logp_old)), and the
loss is ``mean(ppo) + beta * mean(KL)`` over the active rows, KL = k3 (sequence level) or exact
(sum over steps of KL between the full candidate distributions), per ``grpo.kl_estimator``; both
are reported.

* Dropout is off for every log-prob (the model runs in eval mode; gradients still flow).
* Old policy = the policy at the start of each round of ``updates_per_round`` optimizer steps (a
  frozen copy; with 1 update per round it is the current forward, detached, so ratio == 1 exactly).
* Reference = the RCE result (or v2, or none).  With ``none`` the KL term is dropped from the loss
  and the reported KL is measured against the starting policy, for monitoring only.
* Adaptive beta: after each epoch, beta *= factor when the KL in use > kl_high, /= factor when
  < kl_low.  PPO-clip only = kl_beta 0.
* k3 is evaluated on the group's candidates, which are *not* samples of the policy (InfoScore and
  v2 beams, retrieval, random).  There it is not a KL estimate: once the policy pushes a bad
  candidate tens of nats below the reference, exp(ref - logp) explodes (measured on tiny synthetic
  data, plan5 with grpo.lr=1e-3: mean k3 ~ 1e13 while the exact KL was ~2; with k3 in the loss the
  held-out reward fell from 1.57 to 1.15 over 50 epochs, with the exact KL it rose to 1.82).  The log-ratio inside k3 is clamped like the PPO ratio
  so it stays finite; ``kl_estimator: exact`` is the estimator that means what it says.
* freeze_backbone trains only the scoring layers ``score_q`` / ``score_c`` (the final projections
  of the query state and the candidate keys); everything before them is frozen.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lever.config.schema import GRPOConfig
from lever.rl.advantage import group_advantages, zero_variance_groups
from lever.rl.groups import GroupData, batch_step_logprobs, scatter_rows
from lever.rl.losses import entropy, exact_kl, kl_k3_clamped, ppo_terms
from lever.rl.rce import reward_stats
from lever.rl.loop import EpochPhase, Loop, SaveFn, forked_seed, run_epochs
from lever.rl.resume import TrainState
from lever.rl.trainer import EpochRecorder, mean, small_model_threads
from lever.rl.validation import evaluate
from lever.selectors.pointer import SCORING_PREFIXES, PointerSelector, gather_sequence


def frozen_copy(model: PointerSelector) -> PointerSelector:
    m = copy.deepcopy(model)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def set_trainable(model: PointerSelector, freeze_backbone: bool) -> list[torch.nn.Parameter]:
    """Mark what GRPO trains; returns those parameters."""
    out = []
    for name, p in model.named_parameters():
        train = (not freeze_backbone) or name.startswith(SCORING_PREFIXES)
        p.requires_grad_(train)
        if train:
            out.append(p)
    return out


def advantages_for(data: GroupData, cfg: GRPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded advantages [Q, G] and active mask [Q, G] (real rows of groups with variance)."""
    rq, rg = data.rows()
    r = data.rewards[rq, rg]
    mode = "rank" if cfg.rank_advantage else "zscore"
    adv = group_advantages(r, rq, mode=mode, min_std=cfg.min_std, clip=cfg.adv_clip).float()
    active = ~zero_variance_groups(r, rq)
    shape = tuple(data.rewards.shape)
    zeros = torch.zeros(shape, dtype=torch.bool, device=data.device)
    return scatter_rows(adv, rq, rg, shape), zeros.index_put((rq, rg), active)


@dataclass
class GRPOBatch:
    """Everything one GRPO step computes for a batch of query groups (rows = real candidates)."""

    loss: Optional[torch.Tensor]  # None when no row belongs to a group with reward variance
    ppo: torch.Tensor  # scalar, mean over active rows
    ratio: torch.Tensor  # [N]
    clipped: torch.Tensor  # [N] bool
    k3: torch.Tensor  # [N]
    exact: torch.Tensor  # [N]
    active: torch.Tensor  # [N] bool
    entropy: float


def grpo_batch(
    model: PointerSelector,
    ref: PointerSelector,
    old: Optional[PointerSelector],
    emb: torch.Tensor,
    data: GroupData,
    qsel: torch.Tensor,
    adv_all: torch.Tensor,
    active_all: torch.Tensor,
    cfg: GRPOConfig,
    beta: float,
) -> GRPOBatch:
    """The GRPO loss of the groups ``qsel`` (all sizes in one padded pass).  ``old=None``: the old
    policy is the current one (detached); ``beta=0`` drops the KL term (it is still measured)."""
    qsel = qsel.to(data.device)
    step_lp, seqs, rq, rg = batch_step_logprobs(model, emb, data, qsel)
    logp = gather_sequence(step_lp, seqs)
    qi = qsel[rq]
    A = adv_all[qi, rg]
    act = active_all[qi, rg]
    with torch.no_grad():
        old_logp = logp.detach() if old is None else gather_sequence(batch_step_logprobs(old, emb, data, qsel)[0], seqs)
        ref_step = batch_step_logprobs(ref, emb, data, qsel)[0]
        ref_logp = gather_sequence(ref_step, seqs)
    ppo_i, ratio, clipped = ppo_terms(logp, old_logp, A, eps=cfg.clip_eps, log_ratio_clamp=cfg.log_ratio_clamp)
    k3_i = kl_k3_clamped(logp, ref_logp, log_ratio_clamp=cfg.log_ratio_clamp)
    ex_i = exact_kl(step_lp, ref_step)
    ent = float(entropy(step_lp.detach()).mean())
    if not bool(act.any()):
        return GRPOBatch(None, ppo_i.new_zeros(()), ratio.detach(), clipped, k3_i.detach(), ex_i.detach(), act, ent)
    ppo = ppo_i[act].mean()
    kl_term = (k3_i if cfg.kl_estimator == "k3" else ex_i)[act].mean()
    loss = ppo + beta * kl_term
    return GRPOBatch(loss, ppo, ratio.detach(), clipped, k3_i, ex_i, act, ent)


@small_model_threads
def run_grpo(
    model: PointerSelector,
    emb: torch.Tensor,
    train: GroupData,
    val: GroupData,
    cfg: GRPOConfig,
    *,
    epochs: int,
    reference: Optional[PointerSelector],
    recorder: EpochRecorder,
    save: Optional[SaveFn] = None,
    seed: int = 0,
    start_epoch: int = 1,
    phase: str = "grpo",
    extra: Optional[dict] = None,
    state_path: Optional[Path] = None,
    fingerprint: str = "",
) -> tuple[list[dict], float, bool]:
    """Train ``model`` in place (GRPOConfig ``cfg``) for ``epochs``; epochs are numbered from
    ``start_epoch``.  Returns (this call's rows, final beta, stopped-by-hook).  The KL coefficient
    starts at ``cfg.kl_beta``, its only source (a run continuing another's adapted beta passes a
    config carrying it).  With ``state_path`` a killed earlier attempt is resumed (weights, AdamW,
    generator, beta, round position and the round's old policy) and the state is rewritten after
    every epoch."""
    beta = cfg.kl_beta
    if epochs == 0 or len(train) == 0:
        return [], beta, False
    with forked_seed(seed):
        model.eval()  # dropout off for all GRPO log-probs
        params = set_trainable(model, cfg.freeze_backbone)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        loop = Loop(model, params, opt, torch.Generator().manual_seed(seed), recorder, phase, cfg.grad_clip)
        grpo = _GRPOPhase(model, emb, train, val, cfg, reference, extra)
        loop.step = (start_epoch - 1) * grpo.steps
        res = run_epochs(grpo, loop, first_epoch=start_epoch, last_epoch=start_epoch + epochs - 1, save=save,
                         state_path=state_path, fingerprint=fingerprint)
        return res.rows, grpo.beta, res.stopped


def adapt_beta(beta: float, row: dict, cfg: GRPOConfig, use_kl: bool) -> float:
    """The KL coefficient for the next epoch: times ``factor`` when the epoch's KL in use exceeded
    ``kl_high``, divided by it below ``kl_low`` (only with a reference and adaptive beta on)."""
    if use_kl and cfg.adaptive_beta.enabled and beta > 0:
        kl_used = row["kl_k3"] if cfg.kl_estimator == "k3" else row["kl_exact"]
        if kl_used is not None and kl_used > cfg.adaptive_beta.kl_high:
            beta *= cfg.adaptive_beta.factor
        elif kl_used is not None and kl_used < cfg.adaptive_beta.kl_low:
            beta /= cfg.adaptive_beta.factor
    return beta


_ACC = ("loss", "ppo", "k3", "exact", "clip", "ent", "gn")


def grpo_accumulator() -> dict[str, list[float]]:
    """An empty per-epoch accumulator for :func:`grpo_step` / :func:`grpo_means`."""
    return {k: [] for k in _ACC}


def grpo_step(loop: Loop, epoch: int, bt: GRPOBatch, acc: dict[str, list[float]], beta: float,
              more: Optional[dict] = None) -> tuple[float, float]:
    """One optimizer step on a GRPO batch with a loss: accumulates the epoch's means in ``acc``
    and writes the steps.jsonl row; returns (loss, k3 over the active rows)."""
    assert bt.loss is not None
    lv, gn = loop.optimize(bt.loss, epoch)
    act = bt.active
    k3v, exv = float(bt.k3.detach()[act].mean()), float(bt.exact.detach()[act].mean())
    cf = float(bt.clipped[act].float().mean())
    ppo = float(bt.ppo.detach())
    for k, v in zip(_ACC, (lv, ppo, k3v, exv, cf, bt.entropy, gn)):
        acc[k].append(v)
    loop.record_step(epoch, {"loss": lv, "ppo_loss": ppo, "kl_k3": k3v, "kl_exact": exv, "clip_frac": cf,
                             "grad_norm": gn, "beta": beta, **(more or {}),
                             "ratio_min": float(bt.ratio.min()), "ratio_max": float(bt.ratio.max())})
    return lv, k3v


def grpo_means(acc: dict[str, list[float]]) -> dict[str, Optional[float]]:
    """The epoch's mean training metrics from :func:`grpo_step`'s accumulator."""
    return {"train_loss": mean(acc["loss"]), "ppo_loss": mean(acc["ppo"]), "kl_k3": mean(acc["k3"]),
            "kl_exact": mean(acc["exact"]), "clip_frac": mean(acc["clip"]), "entropy": mean(acc["ent"]),
            "grad_norm": mean(acc["gn"])}


class _GRPOPhase(EpochPhase):
    """One offline GRPO epoch over the judged groups; carries beta and the round (old policy)."""

    def __init__(self, model: PointerSelector, emb: torch.Tensor, train: GroupData, val: GroupData, cfg: GRPOConfig,
                 reference: Optional[PointerSelector], extra: Optional[dict]) -> None:
        self.model, self.emb, self.train, self.val, self.cfg, self.extra = model, emb, train, val, cfg, extra
        self.use_kl = reference is not None
        # copied before any resume: with reference none it is the starting policy
        self.ref = reference if reference is not None else frozen_copy(model)
        self.adv_all, self.active_all = advantages_for(train, cfg)
        rq_all, rg_all = train.rows()
        self.adv_rows = self.adv_all[rq_all, rg_all]
        self.adv_active = self.adv_rows[self.active_all[rq_all, rg_all]]
        self.stats = reward_stats(train)
        self.steps = (len(train) + cfg.batch_size - 1) // cfg.batch_size
        self.beta = cfg.kl_beta
        self.old: Optional[PointerSelector] = None
        self.since_refresh = 0

    def train_epoch(self, loop: Loop, epoch: int) -> dict:
        cfg, train = self.cfg, self.train
        perm = torch.randperm(len(train), generator=loop.gen)
        acc = grpo_accumulator()
        skipped = 0
        bar = loop.progress(self.steps, f"{loop.phase} epoch {epoch}")
        for i in bar:
            qsel = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size].to(train.device)
            fresh = self.since_refresh == 0
            if fresh:  # the round starts here: old policy == current policy (ratio exactly 1)
                self.old = frozen_copy(self.model) if cfg.updates_per_round > 1 else None
            bt = grpo_batch(self.model, self.ref, None if fresh else self.old, self.emb, train, qsel, self.adv_all,
                            self.active_all, cfg, self.beta if self.use_kl else 0.0)
            if bt.loss is None:
                skipped += 1
                loop.step += 1
                continue
            lv, k3v = grpo_step(loop, epoch, bt, acc, self.beta)
            self.since_refresh = (self.since_refresh + 1) % cfg.updates_per_round
            bar.set_postfix(loss=f"{lv:.4f}", kl=f"{k3v:.4f}")
            loop.step += 1
        a = self.adv_active
        return {**grpo_means(acc), "adv_std": float(self.adv_rows.std()) if self.adv_rows.numel() > 1 else 0.0,
                "adv_max": float(a.abs().max()) if a.numel() else 0.0, "beta": self.beta if self.use_kl else 0.0,
                **self.stats, "skipped_steps": skipped, **(self.extra or {})}

    def evaluate(self, loop: Loop, epoch: int) -> dict:
        return evaluate(self.model, self.emb, self.val)

    def end_epoch(self, row: dict) -> None:
        self.beta = adapt_beta(self.beta, row, self.cfg, self.use_kl)

    def resume_fields(self) -> dict:
        return {"beta": self.beta, "since_refresh": self.since_refresh,
                "old": self.old if self.since_refresh else None}

    def restore_fields(self, state: TrainState) -> None:
        self.since_refresh = state.since_refresh
        self.beta = float(state.beta) if state.beta is not None else self.beta
        if state.old is not None:
            self.old = frozen_copy(self.model)
            self.old.load_state_dict(state.old)
