"""Reward-weighted cross-entropy (RCE), SPEC section 4.

loss = mean over queries of sum_b softmax_b(r_b / tau) * CE(b), CE(b) = -sequence log-prob, with
tau decaying linearly from tau_start to tau_end over all optimizer steps of the run.  Rewards are
raw or group z-scored (``rce.normalized_reward``).  Dropout stays as configured: RCE is ordinary
supervised training; validation runs with dropout off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from lever.config.schema import RCEConfig
from lever.rl.advantage import group_advantages, zero_variance_groups
from lever.rl.groups import GroupData, batch_step_logprobs, scatter_rows
from lever.rl.losses import entropy, rce_loss
from lever.rl.loop import EpochPhase, Loop, SaveFn, forked_seed, run_epochs
from lever.rl.trainer import EpochRecorder, mean, small_model_threads
from lever.rl.validation import evaluate
from lever.selectors.pointer import PointerSelector, gather_sequence


def tau_at(step: int, total: int, tau_start: float, tau_end: float) -> float:
    """Linear schedule over all steps: step 0 -> tau_start, last step -> tau_end."""
    if total <= 1:
        return tau_start
    return tau_start + (tau_end - tau_start) * step / (total - 1)


def normalized_rewards(data: GroupData) -> torch.Tensor:
    """Group z-scored rewards [Q, G] (zeros in padding and in zero-variance groups)."""
    rq, rg = data.rows()
    adv = group_advantages(data.rewards[rq, rg], rq, mode="zscore")
    return scatter_rows(adv.float(), rq, rg, tuple(data.rewards.shape))


def reward_stats(data: GroupData) -> dict[str, Optional[float]]:
    rq, rg = data.rows()
    r = data.rewards[rq, rg]
    if r.numel() == 0:
        return {"reward_mean": None, "reward_std": None, "zero_std_frac": None}
    zero = zero_variance_groups(r, rq)
    per_group = torch.zeros(len(data), dtype=torch.bool, device=r.device).index_put((rq,), zero)
    return {
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
        "zero_std_frac": float(per_group.float().mean()),
    }


@small_model_threads
def run_rce(
    model: PointerSelector,
    emb: torch.Tensor,
    train: GroupData,
    val: GroupData,
    cfg: RCEConfig,
    *,
    recorder: EpochRecorder,
    save: Optional[SaveFn] = None,
    seed: int = 0,
    grad_clip: float = 1.0,
    phase: str = "rce",
    state_path: Optional[Path] = None,
    fingerprint: str = "",
) -> list[dict]:
    """Train ``model`` in place for ``cfg.epochs`` (RCEConfig); returns this call's per-epoch rows.

    torch's global RNG (dropout) is seeded from ``seed`` inside a forked RNG scope, so a run is
    reproducible and leaves the caller's RNG untouched.  With ``state_path`` the loop resumes from
    the state a killed earlier attempt left there (see :mod:`lever.rl.resume`) and writes it after
    every epoch.
    """
    if cfg.epochs == 0 or len(train) == 0:
        return []
    with forked_seed(seed):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        loop = Loop(model, params, opt, torch.Generator().manual_seed(seed), recorder, phase, grad_clip)
        return run_epochs(_RCEPhase(model, emb, train, val, cfg), loop, first_epoch=1, last_epoch=cfg.epochs,
                          save=save, state_path=state_path, fingerprint=fingerprint).rows


class _RCEPhase(EpochPhase):
    """One RCE epoch: shuffled batches of query groups, reward-weighted CE at the scheduled tau."""

    def __init__(self, model: PointerSelector, emb: torch.Tensor, train: GroupData, val: GroupData,
                 cfg: RCEConfig) -> None:
        self.model, self.emb, self.train, self.val, self.cfg = model, emb, train, val, cfg
        self.rewards = normalized_rewards(train) if cfg.normalized_reward else train.rewards
        self.stats = reward_stats(train)
        self.steps = (len(train) + cfg.batch_size - 1) // cfg.batch_size
        self.total = self.steps * cfg.epochs

    def train_epoch(self, loop: Loop, epoch: int) -> dict:
        cfg, train = self.cfg, self.train
        self.model.train()
        perm = torch.randperm(len(train), generator=loop.gen)
        losses, norms, ents = [], [], []
        bar = loop.progress(self.steps, f"{loop.phase} epoch {epoch}/{cfg.epochs}")
        for i in bar:
            qsel = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size].to(train.device)
            tau = tau_at(loop.step, self.total, cfg.tau_start, cfg.tau_end)
            step_lp, seqs, rq, rg = batch_step_logprobs(self.model, self.emb, train, qsel)
            gm = train.group_mask[qsel]
            logp = scatter_rows(gather_sequence(step_lp, seqs), rq, rg, tuple(gm.shape))
            lv, gn = loop.optimize(rce_loss(logp, self.rewards[qsel], gm, tau), epoch)
            ent = float(entropy(step_lp.detach()).mean())
            losses.append(lv)
            norms.append(gn)
            ents.append(ent)
            loop.record_step(epoch, {"loss": lv, "tau": tau, "grad_norm": gn, "entropy": ent})
            bar.set_postfix(loss=f"{lv:.4f}", tau=f"{tau:.3f}")
            loop.step += 1
        return {"train_loss": mean(losses), "grad_norm": mean(norms), "entropy": mean(ents),
                "tau": tau_at(loop.step - 1, self.total, cfg.tau_start, cfg.tau_end), **self.stats}

    def evaluate(self, loop: Loop, epoch: int) -> dict:
        return evaluate(self.model, self.emb, self.val)
