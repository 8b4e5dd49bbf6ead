"""RL records -> padded group tensors, and the batched log-prob pass over them.

Groups of different sizes live in one [Q, G] layout with a mask; a batch of queries is flattened
to its real (query, candidate) rows so one :func:`~lever.selectors.pointer.step_logprobs` call
covers all of them (the seeds' trainer needed a fixed group size and fell back to batch size 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lever.config.schema import RewardConfig
from lever.errors import StageError
from lever.rl.rewards import plan_reward
from lever.selectors.pointer import PointerSelector, step_logprobs


@dataclass
class GroupData:
    """Padded per-query groups.  Q queries, pools padded to K, groups padded to G, S shots."""

    query_ids: list[int]
    query_idx: torch.Tensor  # [Q] row of the query in the embedding table
    pool: torch.Tensor  # [Q, K] global ids (0 where padded)
    pool_mask: torch.Tensor  # [Q, K] bool
    seqs: torch.Tensor  # [Q, G, S] positions
    group_mask: torch.Tensor  # [Q, G] bool
    rewards: torch.Tensor  # [Q, G] float32 (0 where padded)
    correct: torch.Tensor  # [Q, G] bool

    def __len__(self) -> int:
        return len(self.query_ids)

    @property
    def shots(self) -> int:
        return int(self.seqs.size(-1))

    def subset(self, idx: torch.Tensor | list[int]) -> "GroupData":
        idx = torch.as_tensor(idx, dtype=torch.long).to(self.device)
        return GroupData(
            [self.query_ids[i] for i in idx.tolist()],
            self.query_idx[idx], self.pool[idx], self.pool_mask[idx], self.seqs[idx],
            self.group_mask[idx], self.rewards[idx], self.correct[idx],
        )

    @property
    def device(self) -> torch.device:
        return self.group_mask.device

    def to(self, device: torch.device | str) -> "GroupData":
        return GroupData(self.query_ids, *(t.to(device) for t in (
            self.query_idx, self.pool, self.pool_mask, self.seqs, self.group_mask, self.rewards, self.correct)))

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query index, candidate index) of every real candidate."""
        return self.group_mask.nonzero(as_tuple=True)


def build_groups(
    records: list[dict],
    *,
    n_items: int,
    reward_cfg: Optional[RewardConfig] = None,
    reward_field: Optional[str] = None,
) -> GroupData:
    """Tensors for ``records`` (sorted by query id).  Rewards come from ``reward_cfg`` (RewardConfig)
    or, for the beams, straight from ``reward_field`` of each candidate.  Empty groups are dropped.
    """
    recs = sorted((r for r in records if r["candidates"]), key=lambda r: r["query_id"])
    if not recs:
        return GroupData([], torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long),
                         torch.zeros(0, 1, dtype=torch.bool), torch.zeros(0, 1, 1, dtype=torch.long),
                         torch.zeros(0, 1, dtype=torch.bool), torch.zeros(0, 1), torch.zeros(0, 1, dtype=torch.bool))
    K = max(len(r["pool"]) for r in recs)
    G = max(len(r["candidates"]) for r in recs)
    S = len(recs[0]["candidates"][0]["positions"])
    Q = len(recs)
    pool = torch.zeros(Q, K, dtype=torch.long)
    pool_mask = torch.zeros(Q, K, dtype=torch.bool)
    seqs = torch.zeros(Q, G, S, dtype=torch.long)
    gmask = torch.zeros(Q, G, dtype=torch.bool)
    rewards = torch.zeros(Q, G)
    correct = torch.zeros(Q, G, dtype=torch.bool)
    qidx = torch.zeros(Q, dtype=torch.long)
    for i, r in enumerate(recs):
        qid = r["query_id"]
        if not 0 <= qid < n_items:
            raise StageError(f"query_id {qid}: outside the {n_items} embedded train items (field 'query_id')")
        bad = [p for p in r["pool"] if not 0 <= p < n_items]
        if bad:
            raise StageError(f"query_id {qid}: field 'pool' holds ids {bad[:5]} outside the {n_items} embedded train items")
        qidx[i] = qid
        pool[i, : len(r["pool"])] = torch.tensor(r["pool"])
        pool_mask[i, : len(r["pool"])] = True
        for j, c in enumerate(r["candidates"]):
            if len(c["positions"]) != S:
                raise StageError(f"query_id {qid}: candidates[{j}] has {len(c['positions'])} shots, others {S}")
            seqs[i, j] = torch.tensor(c["positions"])
            gmask[i, j] = True
            correct[i, j] = bool(c.get("correct", False))
            if reward_cfg is not None:
                try:
                    rewards[i, j] = plan_reward(c, reward_cfg)
                except ValueError as e:
                    raise StageError(f"query_id {qid}: candidates[{j}]: {e}") from None
            elif reward_field is not None:
                rewards[i, j] = float(c[reward_field])
    return GroupData([r["query_id"] for r in recs], qidx, pool, pool_mask, seqs, gmask, rewards, correct)


def batch_step_logprobs(
    model: PointerSelector, emb: torch.Tensor, data: GroupData, qsel: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-step log-distributions of every real candidate of the selected queries.

    Returns (step_lp [N,S,K], seqs [N,S], row_q [N] index into ``qsel``, row_g [N]).
    """
    qsel = qsel.to(data.device)
    gm = data.group_mask[qsel]
    rq, rg = gm.nonzero(as_tuple=True)
    qi = qsel[rq]
    query = emb[data.query_idx[qi]]
    cand = emb[data.pool[qi]]
    seqs = data.seqs[qi, rg]
    step_lp = step_logprobs(model, query, cand, seqs, data.pool_mask[qi])
    return step_lp, seqs, rq, rg


def scatter_rows(values: torch.Tensor, rq: torch.Tensor, rg: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Put per-row values [N] back into a padded [b, G] tensor (zeros elsewhere)."""
    out = values.new_zeros(shape)
    return out.index_put((rq, rg), values)
