"""Held-out split and the two validation numbers every RCE/GRPO epoch reports.

* split: RL-data queries sorted by query id; the last ``val_fraction`` are held out (at least one
  when there are >= 2 queries), so RCE and GRPO of one plan validate on the same queries.
* val_loss: the RCE loss at tau 1 with raw rewards on the held-out groups (the reference's number,
  one scale for RCE and GRPO epochs).
* val_reward: expected reward of the policy's greedy sequence per held-out group.  When the greedy
  sequence (same ICDs, same order) is one of the group's candidates, its reward counts.  When it is
  not, the group cannot judge it, so we fall back to the policy-weighted expected reward over the
  group's candidates (softmax of their sequence log-probs, renormalized over the group).
  ``val_greedy_hit`` reports how often the first case applied; ``val_top1`` how often greedy equals
  a best-reward candidate of the group; ``val_group_top1`` how often the candidate the policy ranks
  first *within the group* is a best-reward one (chance = ``val_group_chance``).
"""

from __future__ import annotations

from typing import Optional

import torch

from lever.rl.groups import GroupData, batch_step_logprobs, scatter_rows
from lever.rl.losses import rce_loss
from lever.selectors.pointer import PointerSelector, eval_mode, gather_sequence, greedy


def split_records(records: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    recs = sorted(records, key=lambda r: r["query_id"])
    n = len(recs)
    n_val = 0 if n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    return recs[: n - n_val], recs[n - n_val:]


@torch.no_grad()
def evaluate(model: PointerSelector, emb: torch.Tensor, data: GroupData, batch_size: int = 64) -> dict[str, Optional[float]]:
    """val_loss, val_reward, val_greedy_hit, val_top1 over ``data`` (dropout off)."""
    if len(data) == 0:
        return {k: None for k in ("val_loss", "val_reward", "val_greedy_hit", "val_top1", "val_group_top1",
                                  "val_group_chance")}
    loss_sum = reward_sum = hit_sum = top_sum = gtop_sum = chance_sum = 0.0
    with eval_mode(model):
        for start in range(0, len(data), batch_size):
            qsel = torch.arange(start, min(start + batch_size, len(data)), device=data.device)
            b = len(qsel)
            step_lp, seqs, rq, rg = batch_step_logprobs(model, emb, data, qsel)
            gm = data.group_mask[qsel]
            logp = scatter_rows(gather_sequence(step_lp, seqs), rq, rg, tuple(gm.shape))
            r = data.rewards[qsel]
            loss_sum += float(rce_loss(logp, r, gm, 1.0)) * b
            g = greedy(model, emb[data.query_idx[qsel]], emb[data.pool[qsel]], data.shots, data.pool_mask[qsel])
            match = (data.seqs[qsel] == g[:, None, :]).all(-1) & gm  # [b, G]
            hit = match.any(-1)
            hit_reward = (r * match).sum(-1) / match.sum(-1).clamp(min=1)
            w = torch.softmax(logp.masked_fill(~gm, float("-inf")), -1)
            expected = (w * r).sum(-1)
            reward_sum += float(torch.where(hit, hit_reward, expected).sum())
            hit_sum += float(hit.sum())
            best = r.masked_fill(~gm, float("-inf")).max(-1, keepdim=True).values
            is_best = (r == best) & gm
            top_sum += float((match & is_best).any(-1).sum())
            arg = logp.masked_fill(~gm, float("-inf")).argmax(-1, keepdim=True)
            gtop_sum += float(is_best.gather(1, arg).sum())
            chance_sum += float((is_best.sum(-1) / gm.sum(-1)).sum())
    n = len(data)
    return {"val_loss": loss_sum / n, "val_reward": reward_sum / n, "val_greedy_hit": hit_sum / n, "val_top1": top_sum / n,
            "val_group_top1": gtop_sum / n, "val_group_chance": chance_sum / n}
