"""train-v2: the pointer selector with teacher-forced cross-entropy on the InfoScore beams.

Reads ``beams.jsonl`` shards (DESIGN.md), drops beams scoring under ``v2.score_threshold``, and
minimises the mean over beams of -sequence_logprob.  Validation (same 80/20 split by query id as
RL training): ``val_loss`` = mean CE of held-out beams, ``val_top1`` = greedy sequence equals the
rank-0 beam, ``val_best_in_top`` = greedy sequence is one of the query's beams.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional

import torch

from lever.config.schema import V2TrainConfig
from lever.errors import StageError
from lever.rl.groups import GroupData, batch_step_logprobs
from lever.rl.loop import EpochPhase, Loop, forked_seed, run_epochs
from lever.rl.trainer import EpochRecorder, mean, small_model_threads
from lever.selectors.pointer import PointerSelector, eval_mode, gather_sequence, greedy


def read_beams(paths: Iterable[Path | str], score_threshold: Optional[float] = None) -> tuple[list[dict], dict[str, int]]:
    """Beam records as RL-style records (``candidates`` = kept beams, ordered by rank).

    Returns (records, counts) with counts of queries, beams kept and beams dropped by the threshold.
    Malformed lines raise StageError naming file, line, field and query id.
    """
    out: list[dict] = []
    seen: dict[int, str] = {}
    kept = dropped = 0
    for p in paths:
        path = Path(p) / "beams.jsonl" if Path(p).is_dir() else Path(p)
        if not path.exists():
            raise StageError(f"{path}: beams file not found")
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}: line {lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise StageError(f"{where}: invalid JSON ({e.msg})") from None
                qid = rec.get("query_id") if isinstance(rec, dict) else None
                if isinstance(qid, bool) or not isinstance(qid, int):
                    raise StageError(f"{where}: field 'query_id': expected an integer, got {qid!r}")
                where += f", query_id {qid}"
                pool = rec.get("pool")
                if not isinstance(pool, list) or not pool or not all(isinstance(x, int) and not isinstance(x, bool) for x in pool):
                    raise StageError(f"{where}: field 'pool': expected a non-empty list of integers")
                beams = rec.get("beams")
                if not isinstance(beams, list):
                    raise StageError(f"{where}: field 'beams': expected a list")
                if qid in seen:
                    raise StageError(f"{where}: field 'query_id': duplicate (first at {seen[qid]})")
                seen[qid] = where
                cands = []
                for i, b in enumerate(beams):
                    fld = f"beams[{i}]"
                    if not isinstance(b, dict):
                        raise StageError(f"{where}: field '{fld}': expected an object")
                    pos, ids, score = b.get("positions"), b.get("icd_ids"), b.get("score")
                    if not isinstance(pos, list) or not pos or not all(isinstance(x, int) for x in pos):
                        raise StageError(f"{where}: field '{fld}.positions': expected a non-empty list of integers")
                    if not isinstance(ids, list) or len(ids) != len(pos):
                        raise StageError(f"{where}: field '{fld}.icd_ids': expected {len(pos)} ids")
                    if len(set(pos)) != len(pos):
                        raise StageError(f"{where}: field '{fld}.positions': repeated ICD {pos}")
                    for x, icd in zip(pos, ids):
                        if not 0 <= x < len(pool) or pool[x] != icd:
                            raise StageError(f"{where}: field '{fld}.icd_ids': icd {icd} is not at pool position {x}")
                    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                        raise StageError(f"{where}: field '{fld}.score': expected a finite number, got {score!r}")
                    if score_threshold is not None and score < score_threshold:
                        dropped += 1
                        continue
                    cands.append({"positions": pos, "icd_ids": ids, "score": float(score), "rank": b.get("rank", i)})
                kept += len(cands)
                cands.sort(key=lambda c: c["rank"])
                out.append({"query_id": qid, "pool": pool, "candidates": cands})
    return out, {"queries": len(out), "beams_kept": kept, "beams_dropped": dropped}


@torch.no_grad()
def evaluate_v2(model: PointerSelector, emb: torch.Tensor, data: GroupData, batch_size: int = 64) -> dict[str, Optional[float]]:
    if len(data) == 0:
        return {"val_loss": None, "val_top1": None, "val_best_in_top": None}
    ce_sum = n_rows = top1 = in_top = 0.0
    with eval_mode(model):
        for s in range(0, len(data), batch_size):
            qsel = torch.arange(s, min(s + batch_size, len(data)), device=data.device)
            step_lp, seqs, rq, rg = batch_step_logprobs(model, emb, data, qsel)
            ce_sum += float(-gather_sequence(step_lp, seqs).sum())
            n_rows += len(rq)
            g = greedy(model, emb[data.query_idx[qsel]], emb[data.pool[qsel]], data.shots, data.pool_mask[qsel])
            match = (data.seqs[qsel] == g[:, None, :]).all(-1) & data.group_mask[qsel]
            top1 += float(match[:, 0].sum())  # candidates are ordered by beam rank
            in_top += float(match.any(-1).sum())
    return {"val_loss": ce_sum / max(n_rows, 1), "val_top1": top1 / len(data), "val_best_in_top": in_top / len(data)}


@small_model_threads
def run_v2(
    model: PointerSelector, emb: torch.Tensor, train: GroupData, val: GroupData, cfg: V2TrainConfig, *,
    recorder: EpochRecorder, seed: int = 0, grad_clip: float = 1.0, phase: str = "v2",
    state_path: Optional[Path] = None, fingerprint: str = "",
) -> list[dict]:
    """Teacher-forced CE over all kept beams (V2TrainConfig ``cfg``); trains ``model`` in place.
    Dropout RNG seeded from ``seed`` in a forked scope; ``state_path`` resumes a killed attempt."""
    if cfg.epochs == 0 or len(train) == 0:
        return []
    with forked_seed(seed):
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        loop = Loop(model, params, opt, torch.Generator().manual_seed(seed), recorder, phase, grad_clip)
        return run_epochs(_V2Phase(model, emb, train, val, cfg), loop, first_epoch=1, last_epoch=cfg.epochs,
                          state_path=state_path, fingerprint=fingerprint).rows


class _V2Phase(EpochPhase):
    """One v2 epoch: shuffled batches of query groups, CE of every kept beam."""

    def __init__(self, model: PointerSelector, emb: torch.Tensor, train: GroupData, val: GroupData,
                 cfg: V2TrainConfig) -> None:
        self.model, self.emb, self.train, self.val, self.cfg = model, emb, train, val, cfg
        self.steps = (len(train) + cfg.batch_size - 1) // cfg.batch_size

    def train_epoch(self, loop: Loop, epoch: int) -> dict:
        cfg, train = self.cfg, self.train
        self.model.train()
        perm = torch.randperm(len(train), generator=loop.gen)
        losses, norms = [], []
        for i in loop.progress(self.steps, f"v2 epoch {epoch}/{cfg.epochs}"):
            qsel = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size].to(train.device)
            step_lp, seqs, _, _ = batch_step_logprobs(self.model, self.emb, train, qsel)
            lv, gn = loop.optimize(-gather_sequence(step_lp, seqs).mean(), epoch)
            losses.append(lv)
            norms.append(gn)
            loop.record_step(epoch, {"loss": lv, "grad_norm": gn})
            loop.step += 1
        return {"train_loss": mean(losses), "grad_norm": mean(norms)}

    def evaluate(self, loop: Loop, epoch: int) -> dict:
        return evaluate_v2(self.model, self.emb, self.val)
