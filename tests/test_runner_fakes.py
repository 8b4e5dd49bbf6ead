"""Fake stage functions on the real graph shape (same names, inputs, fan-out, keys).

Why fakes: the runner, the store and the report must be testable without torch models; the real
graph is reused (only ``func`` swapped) so fan-out, content keys and per-unit inputs are the real
ones.  Each fake writes artifacts in the DESIGN.md formats the report reads, and appends
"plan stage unit" to ``$LEVER_FAKE_LOG`` so tests see (across worker processes) what ran.
``$LEVER_FAKE_FAIL=stage[:unit-id]`` makes a stage fail after writing part of its output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path

from lever.errors import StageError
from lever.context import StageContext
from lever.inference.variants import epoch_of_variant
from lever.pipeline.graph import STAGES, Stage

MODULE = __name__


def _log(ctx: StageContext) -> None:
    path = os.environ.get("LEVER_FAKE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{ctx.plan.name} {ctx.stage} {ctx.unit.id}\n")


def _maybe_fail(ctx: StageContext) -> None:
    spec = os.environ.get("LEVER_FAKE_FAIL", "")
    if not spec:
        return
    stage, _, unit = spec.partition(":")
    if stage == ctx.stage and (not unit or unit == ctx.unit.id):
        raise RuntimeError(f"injected failure in {ctx.stage}/{ctx.unit.id}")


def _seed(*parts: object) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)


def generic(ctx: StageContext) -> None:
    _log(ctx)
    digest = {name: [p.name for p in up.paths()] for name, up in ctx.inputs.items()}
    (ctx.out / "out.json").write_text(json.dumps({"stage": ctx.stage, "unit": ctx.unit.id, "inputs": digest}))
    _maybe_fail(ctx)


def rl_data(ctx: StageContext) -> None:
    _log(ctx)
    rng = random.Random(_seed(ctx.config_hash))
    lines = []
    for q in range(6):
        cands = []
        for b in range(4):
            correct = rng.random() < 0.5 if q != 0 else False  # query 0: a zero-variance group
            acc = rng.choice([0.3, 0.6, 1.0]) if correct else 0.0
            cands.append({"icd_ids": [b, b + 1], "positions": [b, b + 1], "source": "random", "rank": b,
                          "beam_score": 0.0, "raw_generation": "x", "pred_answer": "x", "correct": correct,
                          "acc_score": acc, "gt_prob": 0.1, "rel_score": 0.2, "info_score": 0.0,
                          "eval_failed": q == 5 and b == 3})
        lines.append(json.dumps({"schema_version": 1, "query_id": q, "question_id": q, "image_id": q,
                                 "question": "q?", "gt_answers_raw": ["a"] * 10, "gt_answers": ["a"] * 10,
                                 "pool": list(range(8)), "candidates": cands}))
    (ctx.out / "rl_data.jsonl").write_text("\n".join(lines) + "\n")


def train(ctx: StageContext) -> None:
    _log(ctx)
    phase = ctx.stage.split("-")[1]
    epochs = {"rce": ctx.plan.rce.epochs, "grpo": ctx.plan.grpo.epochs, "v2": 1}[phase]
    rows = []
    for e in range(1, epochs + 1):
        rows.append(json.dumps({"epoch": e, "phase": phase, "train_loss": 1.0 / e, "val_loss": 1.2 / e,
                                "val_reward": 0.5 + 0.01 * e, "kl_k3": 0.01 * e, "kl_exact": 0.012 * e,
                                "ppo_loss": -0.1 * e, "adv_std": 0.5}))
        (ctx.out / f"{phase}_epoch{e}.json").write_text(json.dumps({"epoch": e}))
    (ctx.out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    _maybe_fail(ctx)


def select(ctx: StageContext) -> None:
    _log(ctx)
    g = ctx.plan.grpo.epochs
    name = f"grpo_epoch{g}" if g else f"rce_epoch{ctx.plan.rce.epochs}"
    (ctx.out / "selected.json").write_text(json.dumps({"checkpoint": name, "stage": "train-grpo" if g else "train-rce",
                                                      "epoch": g or ctx.plan.rce.epochs, "strategy": "last",
                                                      "reason": "last epoch (strategy last)", "metrics": {}}))


def infer(ctx: StageContext) -> None:
    _log(ctx)
    variant, shot = ctx.unit.get("variant"), ctx.unit.get("shot")
    n, i, m = ctx.plan.infer.num_samples, ctx.unit.get("shard"), ctx.unit.get("of")
    lo, hi = i * n // m, (i + 1) * n // m
    epoch = epoch_of_variant(variant)
    if epoch is not None:  # GRPO epoch N's checkpoint, read from the train-grpo artifact like the real stage
        if not (ctx.input("train-grpo").path / f"grpo_epoch{epoch}.json").exists():
            raise StageError(f"checkpoint grpo_epoch{epoch} missing from train-grpo")
        skill = 0.4 + 0.05 * epoch
    else:
        skill = {"selector": 0.55, "random": 0.35, "retrieval": 0.45, "v2": 0.5, "oracle": 0.8}[variant]
    rows = []
    pred = ctx.out / "predictions.jsonl"
    done = {json.loads(line)["query_index"] for line in pred.read_text().splitlines()} if pred.exists() else set()
    for q in range(lo, hi):
        if q in done:  # resume: a killed attempt already wrote this query
            continue
        rng = random.Random(_seed(ctx.config_hash, q))
        acc = 1.0 if rng.random() < skill else rng.choice([0.0, 0.0, 0.3])
        icds = sorted(rng.sample(range(12), shot)) if variant != "retrieval" else list(range(shot))
        rows.append({"question_id": 1000 + q, "query_index": q, "variant": variant, "shot": shot, "icd_ids": icds,
                     "icd_question_ids": [500 + c for c in icds], "raw_generation": "a", "answer": "a",
                     "accuracy": acc, "eval_failed": False})
    with open(ctx.out / "predictions.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    _maybe_fail(ctx)
    allrows = [json.loads(line) for line in pred.read_text().splitlines()]
    acc = sum(r["accuracy"] for r in allrows) / max(1, len(allrows))
    (ctx.out / "summary.json").write_text(json.dumps({"accuracy": acc, "n": len(allrows)}))


FUNCS = {
    "generate-rl-data": "rl_data", "train-v2": "train", "train-rce": "train", "train-grpo": "train",
    "select-checkpoint": "select", "infer": "infer",
}


def fake_stages(real_summarize: bool = True) -> tuple[Stage, ...]:
    out = []
    for st in STAGES:
        if st.name == "summarize" and real_summarize:
            out.append(st)
            continue
        out.append(dataclasses.replace(st, func=f"{MODULE}:{FUNCS.get(st.name, 'generic')}"))
    return tuple(out)


def read_log(path: Path) -> list[tuple[str, str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split()) for line in path.read_text().splitlines() if line.strip()]  # type: ignore[misc]


def test_fake_graph_keeps_real_shape():
    fakes = fake_stages()
    assert [s.name for s in fakes] == [s.name for s in STAGES]
    assert all(a.inputs == b.inputs and a.fanout == b.fanout for a, b in zip(fakes, STAGES))
