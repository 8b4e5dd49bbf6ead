"""The generate-beams and generate-rl-data stages (sharded by query range, resumable).

Each unit handles the contiguous range of its shard among the first ``num_queries`` train items
and writes one JSON line per query, in query order, to its staging directory.  A restarted unit
keeps the complete lines it finds there and continues with the next query (see
:mod:`lever.sampling.shards`); the output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from lever.models.prompting import icd_example, most_common_answer, query_example
from lever.errors import StageError
from lever.context import StageContext
from lever.sampling.beam_search import beam_record, infoscore_beam_search, plain_scorer
from lever.sampling.rl_data import QueryInputs, query_record, reset_scorer
from lever.sampling.shards import ResumableJsonl, shard_range

log = logging.getLogger(__name__)

BEAMS_FILE = "beams.jsonl"
RL_DATA_FILE = "rl_data.jsonl"

QueryHook = Callable[[int], None]  # called after each query's line is durable (tests: simulated kill)


def make_scorer(lvlm: Any, fast: bool):
    """(prompts, answers) -> probabilities: the fast path when configured and available."""
    if fast:
        try:
            from lever.models.fast_scoring import FastScorer
        except ImportError:
            pass
        else:
            return FastScorer(lvlm)
    return plain_scorer(lvlm)


def _load_common(ctx: StageContext):
    from lever.data.dataset import load_stage_index
    from lever.models.embeddings import load_embeddings

    index = load_stage_index(ctx)
    order = {"train": [r.question_id for r in index.train], "val": [r.question_id for r in index.val]}
    emb = load_embeddings(ctx.input("export-embeddings").path, expected_order=order)
    return index, emb


def _query_range(n_train: int, num_queries: Optional[int], ctx: StageContext, section: str) -> range:
    n = n_train if num_queries is None else num_queries
    if n > n_train:
        raise StageError(f"{section}.num_queries={n} exceeds the {n_train} train items of the dataset")
    return shard_range(n, ctx.unit.shard, ctx.unit.of)


def _progress(ctx: StageContext, queries: range, done: int, desc: str):
    return tqdm(range(queries.start + done, queries.stop), total=len(queries), initial=done, desc=desc,
                unit="query", leave=False, mininterval=1.0)


# ------------------------------------------------------------------------------- beams


def run_generate_beams(ctx: StageContext, lvlm: Any = None, hook: Optional[QueryHook] = None) -> Path:
    from lever.models.factory import plan_lvlm
    from lever.sampling.samplers import build_pool_from_config

    plan = ctx.plan
    index, emb = _load_common(ctx)
    queries = _query_range(len(index.train), plan.beam.num_queries, ctx, "beam")
    out = ResumableJsonl(Path(ctx.out) / BEAMS_FILE, expected_ids=queries)
    t0 = time.time()
    with out:
        if len(out.done) == len(queries):
            return out.path
        lvlm = lvlm or plan_lvlm(plan)
        scorer = make_scorer(lvlm, plan.lvlm.fast)
        for qid in _progress(ctx, queries, len(out.done), f"beams shard {ctx.unit.shard}"):
            rec = index.train[qid]
            reset_scorer(scorer)
            pool_ids = build_pool_from_config(plan.sampler, qid, emb, plan.seed)
            pool = [icd_example(index.train[g]) for g in pool_ids]
            beams, _ = infoscore_beam_search(
                scorer, query_example(rec), most_common_answer(rec.answers), pool, plan.beam.beam_size, plan.beam.shots
            )
            out.append(beam_record(qid, rec.question_id, pool_ids, beams))
            done = qid - queries.start + 1
            ctx.telemetry.progress(done, len(queries), lvlm_calls=getattr(lvlm, "calls", 0))
            if hook:
                hook(qid)
    log.info("generate-beams: %d queries in %.1fs", len(queries), time.time() - t0)
    return out.path


def generate_beams(ctx: StageContext) -> None:
    """Stage entry point (``lever stage generate-beams``)."""
    run_generate_beams(ctx)


# ------------------------------------------------------------------------------- RL data


def read_beams(paths: list[Path]) -> dict[int, dict]:
    """All beams records of the generate-beams units, by query id."""
    out: dict[int, dict] = {}
    for d in paths:
        path = Path(d) / BEAMS_FILE
        if not path.is_file():
            raise StageError(f"generate-beams output has no {BEAMS_FILE}: {path}")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                try:
                    rec = json.loads(line)
                    out[int(rec["query_id"])] = rec
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise StageError(f"{path}:{lineno}: bad beams record ({e})") from None
    return out


def _load_selector(ctx: StageContext) -> Any:
    up = ctx.optional_input("train-v2")
    if up is None:
        log.info("generate-rl-data: no train-v2 input; the v2_beam and v2_sample sources are skipped")
        return None
    from lever.selectors.checkpoint import load_checkpoint

    model, _ = load_checkpoint(Path(up.path) / "model")
    model.eval()
    return model


def run_generate_rl_data(ctx: StageContext, lvlm: Any = None, hook: Optional[QueryHook] = None) -> Path:
    from lever.models.factory import plan_lvlm
    from lever.sampling.samplers import build_pool_from_config

    plan = ctx.plan
    cfg = plan.rl_data
    index, emb = _load_common(ctx)
    queries = _query_range(len(index.train), cfg.num_queries, ctx, "rl_data")
    up = ctx.optional_input("generate-beams")
    beams = read_beams(up.paths()) if up is not None else {}
    if cfg.sources.infoscore_beam.enabled and up is None:
        log.warning("generate-rl-data: no generate-beams input; the infoscore_beam source is skipped")
    out = ResumableJsonl(Path(ctx.out) / RL_DATA_FILE, expected_ids=queries)
    with out:
        if len(out.done) == len(queries):
            return out.path
        lvlm = lvlm or plan_lvlm(plan)
        scorer = make_scorer(lvlm, plan.lvlm.fast)
        selector = _load_selector(ctx)
        cand = emb.candidates
        for qid in _progress(ctx, queries, len(out.done), f"rl-data shard {ctx.unit.shard}"):
            rec = index.train[qid]
            reset_scorer(scorer)
            beam_rec = beams.get(qid)
            pool_ids = list(beam_rec["pool"]) if beam_rec else build_pool_from_config(plan.sampler, qid, emb, plan.seed)
            if len(pool_ids) < cfg.shots:
                raise StageError(f"rl_data.shots={cfg.shots} but query {qid} has a pool of {len(pool_ids)}")
            inp = QueryInputs(
                query_id=qid, question_id=rec.question_id, image_id=rec.image_id, question=rec.question,
                gt_answers_raw=list(rec.answers), query=query_example(rec), pool_ids=pool_ids,
                pool=[icd_example(index.train[g]) for g in pool_ids],
                query_emb=emb.train_query[qid], pool_emb=cand[torch.tensor(pool_ids, dtype=torch.long)],
                beam_rec=beam_rec,
            )
            out.append(query_record(inp, lvlm, cfg, plan.beam.beam_size, plan.seed, selector, scorer))
            ctx.telemetry.progress(qid - queries.start + 1, len(queries), lvlm_calls=getattr(lvlm, "calls", 0))
            if hook:
                hook(qid)
    return out.path


def generate_rl_data(ctx: StageContext) -> None:
    """Stage entry point (``lever stage generate-rl-data``)."""
    run_generate_rl_data(ctx)
