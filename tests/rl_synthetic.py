"""Synthetic RL data and beams with a learnable notion of "best", for tests and tiny runs.

No LVLM: each train item gets a random unit embedding, and a hidden direction ``u`` gives every
item a quality ``<e_i, u>``.  A sequence's score for a query is the mean over its ICDs of
``2 * <e_i, u> + <e_i, q>``; the LVLM verdict fields are deterministic functions of that score
(``correct`` = score above a threshold).  The best candidate of a group is therefore identifiable
from the embeddings alone, which is what a selector must learn.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Optional

import torch

from lever.selectors.checkpoint import atomic_save_tensors, atomic_write_bytes, atomic_write_json


def synthetic_embeddings(n_items: int, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit embeddings [n, dim], hidden quality direction u [dim])."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n_items, dim, generator=g), dim=-1)
    u = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    return emb, u


def sequence_score(emb: torch.Tensor, u: torch.Tensor, query_id: int, icd_ids: list[int]) -> float:
    e = emb[icd_ids]
    return float((2.0 * (e @ u) + e @ emb[query_id]).mean())


def _candidate(emb: torch.Tensor, u: torch.Tensor, qid: int, pool: list[int], pos: list[int], source: str,
               rank: int, threshold: float) -> dict:
    ids = [pool[p] for p in pos]
    s = sequence_score(emb, u, qid, ids)
    correct = s > threshold
    # VQA-accuracy-like steps: 0 when wrong, 0.3 / 0.6 / 0.9 / 1.0 growing with the margin
    acc = round(min(1.0, 0.3 * math.ceil((s - threshold) / 0.2 + 1e-9)), 4) if correct else 0.0
    gt_prob = 1.0 / (1.0 + math.exp(-4.0 * s))
    return {
        "icd_ids": ids, "positions": pos, "source": source, "rank": rank, "beam_score": s,
        "raw_generation": "yes" if correct else "no", "pred_answer": "yes" if correct else "no",
        "correct": bool(correct), "acc_score": float(acc), "gt_prob": gt_prob,
        "rel_score": 1.0 / (1.0 + math.exp(-2.0 * s)), "info_score": s, "eval_failed": False,
    }


def make_rl_records(
    emb: torch.Tensor,
    u: torch.Tensor,
    *,
    query_ids: list[int],
    pool_size: int = 12,
    shots: int = 2,
    group_sizes: tuple[int, int] = (4, 12),
    threshold: Optional[float] = None,
    seed: int = 0,
) -> list[dict]:
    """One RL record per query: random pool (excluding the query), random distinct sequences."""
    rng = random.Random(seed)
    n = emb.size(0)
    if threshold is None:
        threshold = float((2.0 * (emb @ u)).median())
    out = []
    for qid in query_ids:
        pool = rng.sample([i for i in range(n) if i != qid], pool_size)
        size = rng.randint(*group_sizes)
        seen: set[tuple[int, ...]] = set()
        cands = []
        tries = 0
        while len(cands) < size and tries < 50 * size:
            tries += 1
            pos = rng.sample(range(pool_size), shots)
            if tuple(pos) in seen:
                continue
            seen.add(tuple(pos))
            cands.append(_candidate(emb, u, qid, pool, pos, "random", len(cands), threshold))
        out.append({
            "schema_version": 1, "query_id": qid, "question_id": 1000 + qid, "image_id": 5000 + qid,
            "question": f"synthetic question {qid}?", "gt_answers_raw": ["yes"] * 10, "gt_answers": ["yes"] * 10,
            "pool": pool, "candidates": cands,
        })
    return out


def make_beam_records(
    emb: torch.Tensor, u: torch.Tensor, *, query_ids: list[int], pool_size: int = 12, shots: int = 2,
    beam_size: int = 3, seed: int = 0,
) -> list[dict]:
    """``beams.jsonl`` records whose beams are the top sequences by the synthetic score (greedy
    per step, like InfoScore beam search); score = the sequence's synthetic score."""
    rng = random.Random(seed)
    n = emb.size(0)
    out = []
    for qid in query_ids:
        pool = rng.sample([i for i in range(n) if i != qid], pool_size)
        beams: list[tuple[list[int], float]] = [([], 0.0)]
        for _ in range(shots):
            nxt = []
            for pos, _s in beams:
                for p in range(pool_size):
                    if p not in pos:
                        seq = pos + [p]
                        nxt.append((seq, sequence_score(emb, u, qid, [pool[i] for i in seq])))
            nxt.sort(key=lambda t: -t[1])
            beams = nxt[:beam_size]
        out.append({
            "query_id": qid, "question_id": 1000 + qid, "pool": pool,
            "beams": [{"icd_ids": [pool[i] for i in pos], "positions": pos, "score": s, "rank": r}
                      for r, (pos, s) in enumerate(beams)],
        })
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    atomic_write_bytes(Path(path), "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
    return Path(path)


def write_embeddings_dir(out: Path, emb: torch.Tensor, n_val: int = 4) -> Path:
    """An ``export-embeddings``-shaped artifact (DESIGN.md) whose train_query rows are ``emb``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    val = emb[:n_val].clone()
    tensors = {"train_image": emb, "train_text": emb, "train_query": emb,
               "val_image": val, "val_text": val, "val_query": val}
    atomic_save_tensors(out / "embeddings.safetensors", tensors)
    atomic_write_json(out / "order.json", {"train": [1000 + i for i in range(emb.size(0))],
                                          "val": [9000 + i for i in range(n_val)]})
    return out


def write_training_inputs(
    root: Path, *, n_items: int = 96, dim: int = 16, n_queries: int = 32, pool_size: int = 12, shots: int = 2,
    group_sizes: tuple[int, int] = (4, 12), shards: int = 2, seed: int = 0,
) -> dict[str, list[Path]]:
    """Upstream artifacts of the training stages, LVLM-free: ``export-embeddings``,
    ``generate-beams`` and ``generate-rl-data`` directories (shards split by query range)."""
    root = Path(root)
    emb, u = synthetic_embeddings(n_items, dim, seed)
    qids = list(range(n_queries))
    beams = make_beam_records(emb, u, query_ids=qids, pool_size=pool_size, shots=shots, seed=seed)
    rl = make_rl_records(emb, u, query_ids=qids, pool_size=pool_size, shots=shots, group_sizes=group_sizes,
                         seed=seed + 1)
    out: dict[str, list[Path]] = {"export-embeddings": [write_embeddings_dir(root / "emb", emb)]}
    out["generate-beams"], out["generate-rl-data"] = [], []
    per = (n_queries + shards - 1) // shards
    for i in range(shards):
        d = root / f"beams{i}"
        write_jsonl(d / "beams.jsonl", beams[i * per:(i + 1) * per])
        out["generate-beams"].append(d)
        d = root / f"rl{i}"
        write_jsonl(d / "rl_data.jsonl", rl[i * per:(i + 1) * per])
        out["generate-rl-data"].append(d)
    return out
