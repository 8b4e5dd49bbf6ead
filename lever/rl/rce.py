"""Reward-weighted cross-entropy (RCE), SPEC section 4.

loss = mean over queries of sum_b softmax_b(r_b / tau) * CE(b), CE(b) = -sequence log-prob, with
tau decaying linearly from tau_start to tau_end over all optimizer steps of the run.  Rewards are
raw or group z-scored (``rce.normalized_reward``).  Dropout stays as configured: RCE is ordinary
supervised training; validation runs with dropout off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from lever.config.schema import RCEConfig
from lever.rl.advantage import group_advantages, zero_variance_groups
from lever.rl.groups import GroupData, batch_step_logprobs, scatter_rows
from lever.rl.losses import entropy, rce_loss
from lever.rl.resume import load_state, restore, save_state
from lever.rl.trainer import EpochRecorder, check_finite, clip_and_check, mean, small_model_threads
from lever.rl.validation import evaluate
from lever.selectors.pointer import PointerSelector, gather_sequence

SaveFn = Callable[[PointerSelector, int, dict], None]


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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _rce_epochs(model, emb, train, val, cfg, recorder=recorder, save=save, seed=seed,
                           grad_clip=grad_clip, phase=phase, state_path=state_path, fingerprint=fingerprint)


def _rce_epochs(
    model: PointerSelector, emb: torch.Tensor, train: GroupData, val: GroupData, cfg: RCEConfig, *,
    recorder: EpochRecorder, save: Optional[SaveFn], seed: int, grad_clip: float, phase: str,
    state_path: Optional[Path], fingerprint: str,
) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    st = load_state(state_path, fingerprint) if state_path is not None else None
    first, step = 1, 0
    if st is not None:
        restore(st, model, opt, gen)
        first, step = st.epoch + 1, st.global_step
        recorder.restore(st.epoch)
    rewards = normalized_rewards(train) if cfg.normalized_reward else train.rewards
    stats = reward_stats(train)
    steps_per_epoch = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    rows = []
    if recorder.stopped is not None:  # a hook stopped an earlier attempt on this dir
        return rows
    for epoch in range(first, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        losses, norms, ents = [], [], []
        bar = tqdm(range(steps_per_epoch), desc=f"{phase} epoch {epoch}/{cfg.epochs}", leave=False, disable=None)
        for i in bar:
            qsel = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size].to(train.device)
            tau = tau_at(step, total, cfg.tau_start, cfg.tau_end)
            step_lp, seqs, rq, rg = batch_step_logprobs(model, emb, train, qsel)
            gm = train.group_mask[qsel]
            logp = scatter_rows(gather_sequence(step_lp, seqs), rq, rg, tuple(gm.shape))
            loss = rce_loss(logp, rewards[qsel], gm, tau)
            lv = check_finite(loss, "loss", phase, epoch, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = clip_and_check(params, grad_clip, phase, epoch, step)
            opt.step()
            ent = float(entropy(step_lp.detach()).mean())
            losses.append(lv)
            norms.append(gn)
            ents.append(ent)
            recorder.step(phase, step, {"epoch": epoch, "loss": lv, "tau": tau, "grad_norm": gn, "entropy": ent})
            bar.set_postfix(loss=f"{lv:.4f}", tau=f"{tau:.3f}")
            step += 1
        v = evaluate(model, emb, val)
        row = {"train_loss": mean(losses), **v, "grad_norm": mean(norms), "entropy": mean(ents),
               "tau": tau_at(step - 1, total, cfg.tau_start, cfg.tau_end), **stats}
        if save is not None:
            save(model, epoch, row)
        rows.append(row)
        stop = recorder.epoch(phase, epoch, row)  # hooks run before the resume state is written
        if state_path is not None:
            save_state(state_path, model=model, opt=opt, gen=gen, epoch=epoch, global_step=step,
                       fingerprint=fingerprint)
        if stop:
            break
    return rows

