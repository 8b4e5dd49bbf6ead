"""The ``infer`` stage: one (variant, shot, shard) unit of evaluation.

Variants: ``selector`` (the chosen checkpoint, via convert), ``epoch{N}`` (GRPO epoch N's
checkpoint from train-grpo, for ``checkpoint.evaluate_epochs``), ``v2``, ``random``, ``retrieval``,
``oracle`` (synthetic data: knows the planted attribute).
Eval queries are the first ``infer.num_samples`` items of ``infer.split`` (recorded order), cut
into ``of`` contiguous ranges; this unit does range ``shard``.  Each query gets its ICDs from the
variant (``selection.py``), the LVLM generates in batches, the answer is post-processed and scored
with the standard VQA accuracy.  Rows are appended (and fsynced) batch by batch to
``predictions.jsonl`` in the staging dir, so a killed unit resumes where it stopped; rows whose
generation failed are written with ``eval_failed`` and retried on the next attempt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from lever.errors import StageError
from lever.context import StageContext
from lever.inference.variants import epoch_of_variant
from lever.io import atomic_write_bytes, atomic_write_json, atomic_write_text

PREDICTIONS = "predictions.jsonl"
#: written, with an empty predictions file, by an epoch unit whose epoch the guard kept from training
SKIPPED = "skipped.json"
#: a unit whose LVLM calls mostly fail is broken, not noisy: refuse to commit it
MAX_FAILED_SHARE = 0.5


def shard_range(n: int, shard: int, of: int) -> tuple[int, int]:
    return shard * n // of, (shard + 1) * n // of


def read_done(path: Path) -> dict[int, dict]:
    """Finished rows of a previous attempt by query_index.  A torn last line (kill mid-write) and
    failed rows are dropped, and the file is rewritten without them."""
    if not path.exists():
        return {}
    keep: dict[int, dict] = {}
    dirty = False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            qi = int(row["query_index"])
        except (ValueError, KeyError, TypeError):
            dirty = True
            break
        if row.get("eval_failed"):
            dirty = True
            continue
        keep[qi] = row
    if dirty:
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep.values()).encode())
    return keep


def _checkpoint_stem(directory: Path, preferred: str) -> Path:
    if (directory / f"{preferred}.json").exists():
        return directory / preferred
    stems = sorted(p.with_suffix("") for p in directory.glob("*.json") if p.with_suffix(".safetensors").exists())
    if len(stems) != 1:
        raise StageError(f"{directory}: expected {preferred}.json/.safetensors (a pointer checkpoint)")
    return stems[0]


def _uses_selector(variant: str) -> bool:
    """Variants whose ICDs a pointer selector chooses (the others are random / retrieval)."""
    return variant in ("selector", "v2") or epoch_of_variant(variant) is not None


def _epoch_stem(ctx: StageContext, epoch: int) -> Path:
    """GRPO epoch ``epoch``'s checkpoint in the train-grpo artifact; a StageError naming it when
    training never wrote it (stopped early by the divergence guard, or fewer epochs ran)."""
    from lever.training.checkpoints import available_epochs

    d = ctx.input("train-grpo").path
    have = available_epochs(d, "grpo")
    if epoch not in have:
        raise StageError(f"{d}: checkpoint grpo_epoch{epoch} missing (checkpoint.evaluate_epochs lists epoch {epoch}; "
                         f"train-grpo holds epochs {have or 'none'})")
    return d / f"grpo_epoch{epoch}"


def _epoch_stopped(ctx: StageContext, epoch: int) -> Optional[str]:
    """Why GRPO epoch ``epoch`` was never trained, when the divergence guard stopped train-grpo
    before it (``stopped.json``) -- an outcome the report shows, not a failure; None otherwise
    (a checkpoint missing without a stop is still a StageError)."""
    from lever.training.checkpoints import available_epochs, stopped_info

    d = ctx.input("train-grpo").path
    if epoch in available_epochs(d, "grpo"):
        return None
    stop = stopped_info(d)
    if not stop:
        return None
    return f"train-grpo stopped after {stop.get('phase', 'grpo')} epoch {stop.get('epoch')}: {stop.get('reason', '')}"


def _load_selector(ctx: StageContext, variant: str) -> Any:
    from lever.selectors.checkpoint import load_checkpoint

    epoch = epoch_of_variant(variant)
    if variant == "selector":
        stem = _checkpoint_stem(ctx.input("convert").path, "v2format")
    elif epoch is not None:
        stem = _epoch_stem(ctx, epoch)
    else:
        stem = _checkpoint_stem(ctx.input("train-v2").path, "model")
    model, _meta = load_checkpoint(stem)
    model.eval()
    return model


def _oracle_labels(data_dir: Path, train: list, queries: list) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train labels, query labels) = (question type, planted value) per item, from the synthetic
    generator's annotations inside the prepare-data artifact."""
    from lever.data.synthetic import SyntheticLayout, planted_labels

    try:
        labels = planted_labels(SyntheticLayout(data_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise StageError(f"{data_dir}: the oracle reference needs the synthetic dataset's planted labels "
                         f"({type(exc).__name__}: {exc})") from None
    try:
        return [labels[r.question_id] for r in train], [labels[r.question_id] for r in queries]
    except KeyError as exc:
        raise StageError(f"{data_dir}: question_id {exc} has no planted label") from None


def infer(ctx: StageContext) -> None:
    from tqdm import tqdm

    from lever.data.dataset import load_stage_index
    from lever.inference.selection import (check_pool, choose_oracle, choose_random, choose_retrieval,
                                           choose_selector, pools_for)
    from lever.metrics import vqa_accuracy
    from lever.models.embeddings import load_embeddings
    from lever.models.factory import plan_lvlm
    from lever.models.lvlm import postprocess_generation
    from lever.models.prompting import icd_example, query_example

    cfg = ctx.plan.infer
    variant, shot = ctx.unit.variant, ctx.unit.shot
    shard, of = ctx.unit.shard, ctx.unit.of
    index = load_stage_index(ctx)
    emb = load_embeddings(ctx.input("export-embeddings").path)
    queries = index.split(cfg.split)
    train = index.train
    n = min(cfg.num_samples, len(queries))
    if cfg.num_samples > len(queries):
        ctx.log.warning("infer.num_samples=%d but split %r has %d items: evaluating %d",
                        cfg.num_samples, cfg.split, len(queries), len(queries))
    lo, hi = shard_range(n, shard, of)
    exclude_self = cfg.split == "train"
    check_pool(shot, len(train), cfg.pool, cfg.retrieve_top_n, exclude_self, f"plan {ctx.plan.name!r} infer")
    if emb.train_query.shape[0] != len(train) or emb.get(cfg.split, "query").shape[0] != len(queries):
        raise StageError(f"{ctx.input('export-embeddings').path}: embedding rows do not match the dataset "
                         f"({emb.train_query.shape[0]} train rows for {len(train)} items)")

    epoch = epoch_of_variant(variant)
    if epoch is not None:
        why = _epoch_stopped(ctx, epoch)
        if why is not None:
            ctx.log.warning("infer %s shot %d: not evaluated, %s", variant, shot, why)
            atomic_write_text(ctx.out / PREDICTIONS, "")
            atomic_write_json(ctx.out / SKIPPED, {"variant": variant, "shot": shot, "reason": why}, indent=2)
            return
        _epoch_stem(ctx, epoch)  # a missing epoch fails before any LVLM work
    out = ctx.out / PREDICTIONS
    done = read_done(out)
    todo = [q for q in range(lo, hi) if q not in done]
    model = _load_selector(ctx, variant) if _uses_selector(variant) and todo else None
    lvlm = plan_lvlm(ctx.plan) if todo else None
    train_labels, query_labels = _oracle_labels(ctx.input("prepare-data").path, train, queries) if variant == "oracle" and todo else ([], [])
    q_img_all = emb.get(cfg.split, "image")
    q_emb_all = emb.get(cfg.split, "query")
    batch = max(1, ctx.plan.lvlm.batch_size)
    failed = 0
    errors: list[str] = []
    bar = tqdm(total=len(todo), desc=f"infer {variant} shot{shot} [{lo},{hi})", unit="q",
               disable=not todo or None)
    with open(out, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch):
            qs = todo[start:start + batch]
            self_ids = [q if exclude_self else None for q in qs]
            pools = pools_for(q_img_all[qs], emb.train_image, cfg.pool, cfg.retrieve_top_n, self_ids)
            if variant == "random":
                icds = [choose_random(p, shot, cfg.seed, q) for p, q in zip(pools, qs)]
            elif variant == "retrieval":
                icds = [choose_retrieval(q_img_all[q], emb.train_image, p, shot) for p, q in zip(pools, qs)]
            elif variant == "oracle":
                icds = [choose_oracle(query_labels[q], train_labels, q_img_all[q], emb.train_image, p, shot)
                        for p, q in zip(pools, qs)]
            elif _uses_selector(variant):
                icds = choose_selector(model, q_emb_all[qs], emb.candidates, pools, shot)
            else:
                raise StageError(f"unknown inference variant {variant!r}")
            for ids in icds:
                if len(set(ids)) != shot:
                    raise StageError(f"variant {variant} returned {len(set(ids))} distinct ICDs for shot {shot}")
            prompts = [[icd_example(train[i]) for i in ids] + [query_example(queries[q])] for ids, q in zip(icds, qs)]
            gens, errs = _generate(lvlm, prompts, ctx.plan.lvlm.max_new_tokens)
            for q, ids, gen, err in zip(qs, icds, gens, errs):
                rec = queries[q]
                row: dict[str, Any] = {
                    "question_id": rec.question_id, "query_index": q, "variant": variant, "shot": shot,
                    "icd_ids": ids, "icd_question_ids": [train[i].question_id for i in ids],
                }
                if err is None:
                    answer = postprocess_generation(gen)
                    row.update(raw_generation=gen, answer=answer, accuracy=float(vqa_accuracy(answer, rec.answers)),
                               eval_failed=False)
                else:
                    failed += 1
                    errors.append(err)
                    row.update(raw_generation="", answer="", accuracy=0.0, eval_failed=True, error=err[:500])
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(qs))
            ctx.telemetry.progress(start + len(qs), len(todo), lvlm_calls=getattr(lvlm, "calls", 0))
    bar.close()
    if todo and failed > MAX_FAILED_SHARE * len(todo):
        raise StageError(f"infer {variant} shot {shot}: the LVLM failed on {failed}/{len(todo)} queries "
                         f"(first error: {errors[0]}); not committing")
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] if out.exists() else []
    ok = [r for r in rows if not r.get("eval_failed")]
    acc = sum(r["accuracy"] for r in ok) / len(ok) if ok else 0.0
    summary = {"accuracy": acc, "n": len(ok), "n_failed": failed, "variant": variant, "shot": shot,
               "shard": shard, "of": of, "query_range": [lo, hi], "split": cfg.split}
    atomic_write_bytes(ctx.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    ctx.telemetry.accuracy(variant, shot, acc)
    ctx.log.info("infer %s shot %d shard %d/%d: accuracy %.4f over %d queries", variant, shot, shard, of, acc, len(ok))


def _generate(lvlm: Any, prompts: list, max_new_tokens: int) -> tuple[list[str], list[Optional[str]]]:
    """Batched generation; if the batch fails, retry one by one so one bad item (an unreadable
    image) costs one row, not the batch."""
    try:
        return list(lvlm.generate(prompts, max_new_tokens=max_new_tokens)), [None] * len(prompts)
    except Exception:
        gens: list[str] = []
        errs: list[Optional[str]] = []
        for p in prompts:
            try:
                gens.append(lvlm.generate([p], max_new_tokens=max_new_tokens)[0])
                errs.append(None)
            except Exception as exc:  # recorded per row and counted in the report
                gens.append("")
                errs.append(f"{type(exc).__name__}: {exc}")
        return gens, errs
