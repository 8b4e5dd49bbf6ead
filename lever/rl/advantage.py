"""Group-relative advantages for GRPO, vectorized over groups of any size in any order.

The seeds' trainer assumed a fixed number of candidates per query and broke on the "k64 v3" data
(11-40 per group); here every group statistic is a scatter over a group index, so a batch may mix
group sizes freely without padding tricks or a batch size of 1.
"""

from __future__ import annotations

import torch

ADVANTAGE_MODES: tuple[str, ...] = ("zscore", "rank")


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    _, inv = torch.unique(group_ids, return_inverse=True)
    return inv, int(inv.max().item()) + 1 if inv.numel() else 0


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    mode: str = "zscore",
    min_std: float = 0.1,
    clip: float = 5.0,
) -> torch.Tensor:
    """Advantages [N] for rewards [N] grouped by ``group_ids`` [N].

    zscore: (r - mean_g) / max(std_g, min_std) with Bessel's correction; rank: 1 - 2*rank/(n-1),
    rank 0 = highest, ties share their average rank.  Groups of size 1 or with all rewards equal
    get exactly 0.  The result is clipped to [-clip, clip].
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; allowed: {', '.join(ADVANTAGE_MODES)}")
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    g = torch.as_tensor(group_ids).reshape(-1).long().to(r.device)
    if r.shape != g.shape:
        raise ValueError(f"rewards {tuple(r.shape)} and group_ids {tuple(g.shape)} differ in size")
    if not torch.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf")
    out_dtype = rewards.dtype if isinstance(rewards, torch.Tensor) and rewards.is_floating_point() else torch.float32
    if r.numel() == 0:
        return torch.zeros(0, dtype=out_dtype, device=r.device)
    inv, G = _group_index(g)
    n = torch.zeros(G, dtype=torch.float64, device=r.device).scatter_add_(0, inv, torch.ones_like(r))
    rmax = torch.full((G,), -torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, inv, r, "amax")
    rmin = torch.full((G,), torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, inv, r, "amin")
    active = (n > 1) & (rmax > rmin)
    if mode == "zscore":
        mean = torch.zeros(G, dtype=torch.float64, device=r.device).scatter_add_(0, inv, r) / n
        dev = r - mean[inv]
        var = torch.zeros(G, dtype=torch.float64, device=r.device).scatter_add_(0, inv, dev * dev) / (n - 1).clamp(min=1)
        std = var.sqrt().clamp(min=min_std)
        adv = dev / std[inv]
    else:
        # sort by group, then by reward descending: a stable two-pass sort
        order = torch.argsort(-r, stable=True)
        order = order[torch.argsort(inv[order], stable=True)]
        gs, rs = inv[order], r[order]
        start = torch.zeros(G, dtype=torch.long, device=r.device)
        start[1:] = torch.cumsum(torch.bincount(inv, minlength=G), 0)[:-1]
        pos = torch.arange(r.numel(), dtype=torch.float64, device=r.device) - start[gs].double()
        # runs of equal (group, reward) share the mean of their positions
        new_run = torch.ones_like(gs, dtype=torch.bool)
        new_run[1:] = (gs[1:] != gs[:-1]) | (rs[1:] != rs[:-1])
        run = torch.cumsum(new_run.long(), 0) - 1
        R = int(run[-1].item()) + 1
        run_sum = torch.zeros(R, dtype=torch.float64, device=r.device).scatter_add_(0, run, pos)
        run_n = torch.zeros(R, dtype=torch.float64, device=r.device).scatter_add_(0, run, torch.ones_like(pos))
        rank_sorted = run_sum[run] / run_n[run]
        rank = torch.empty_like(rank_sorted)
        rank[order] = rank_sorted
        adv = 1.0 - 2.0 * rank / (n[inv] - 1).clamp(min=1)
    adv = torch.where(active[inv], adv, torch.zeros_like(adv)).clamp(-clip, clip)
    return adv.to(out_dtype)


def zero_variance_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Bool [N]: True where the row's group has size 1 or all-equal rewards (excluded from GRPO)."""
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    inv, G = _group_index(torch.as_tensor(group_ids).reshape(-1).long().to(r.device))
    if G == 0:
        return torch.zeros(0, dtype=torch.bool, device=r.device)
    n = torch.zeros(G, dtype=torch.float64, device=r.device).scatter_add_(0, inv, torch.ones_like(r))
    rmax = torch.full((G,), -torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, inv, r, "amax")
    rmin = torch.full((G,), torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, inv, r, "amin")
    return (~((n > 1) & (rmax > rmin)))[inv]
