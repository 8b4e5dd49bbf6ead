"""Regenerate the bad-input corpus (``python tests/data/bad/make_corpus.py``).

Each file differs from a valid input in exactly one way, named by the file; ``EXPECTED`` in
``tests/test_reliability_validate.py`` lists the field each one must be rejected for.  The files
are committed (small) so ``lever validate`` can be tried on them by hand; this script documents
how they were made and rebuilds them after a format change.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rl_base() -> list[dict]:
    """Two valid RL records (pool 4, shots 2) with short numbers."""
    recs = []
    for q in (3, 5):
        pool = [10 + q, 20 + q, 30 + q, 40 + q]
        cands = []
        for r, pos in enumerate([[0, 1], [2, 3], [1, 2]]):
            ok = r == 0
            cands.append({
                "icd_ids": [pool[p] for p in pos], "positions": pos, "source": "random", "rank": r,
                "beam_score": 0.5 - 0.1 * r, "raw_generation": "yes" if ok else "no",
                "pred_answer": "yes" if ok else "no", "correct": ok, "acc_score": 1.0 if ok else 0.0,
                "gt_prob": 0.8 if ok else 0.1, "rel_score": 1.0 if ok else 0.0, "info_score": 0.1,
                "eval_failed": False,
            })
        recs.append({
            "schema_version": 1, "query_id": q, "question_id": 1000 + q, "image_id": 5000 + q,
            "question": f"what is shown {q}?", "gt_answers_raw": ["yes"] * 10, "gt_answers": ["yes"] * 10,
            "pool": pool, "candidates": cands,
        })
    return recs


def _dump(recs: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in recs)


def rl_corpus() -> dict[str, str]:
    out: dict[str, str] = {}
    base = _rl_base()

    def mutated(fn) -> str:
        recs = copy.deepcopy(base)
        fn(recs)
        return _dump(recs)

    text = _dump(base)
    out["truncated.jsonl"] = text[: len(text) - 40]  # the writer died mid-line
    out["wrong_types.jsonl"] = mutated(lambda r: (r[1]["candidates"][0].__setitem__("acc_score", "1.0"),
                                                  r[1].__setitem__("image_id", "5005")))
    out["missing_fields.jsonl"] = mutated(lambda r: (r[0].pop("question"), r[1]["candidates"][2].pop("correct")))
    out["nan_reward.jsonl"] = mutated(lambda r: (r[0]["candidates"][1].__setitem__("acc_score", math.nan),
                                                 r[1]["candidates"][0].__setitem__("gt_prob", math.inf)))
    out["empty_group.jsonl"] = mutated(lambda r: r[1].__setitem__("candidates", []))
    out["duplicate_query.jsonl"] = mutated(lambda r: r.append(copy.deepcopy(r[0])))

    def small_pool(r: list[dict]) -> None:
        rec = r[1]
        rec["pool"] = rec["pool"][:1]
        rec["candidates"] = [dict(rec["candidates"][0], icd_ids=[rec["pool"][0], 99], positions=[0, 1])]
    out["pool_smaller_than_shots.jsonl"] = mutated(small_pool)
    out["newer_schema.jsonl"] = mutated(lambda r: r[0].__setitem__("schema_version", 3))
    return out


PLANS: dict[str, str] = {
    "typo.yaml": "name: typo\nextends: baseline\ngrpo:\n  epochs: 3\n  kl_betta: 0.12\n",
    "unknown_reward_mode.yaml": "name: bad_reward\nextends: plan1\nreward:\n  mode: hard_plus_sofft\n",
    "pool_smaller_than_shots.yaml": "name: small_pool\nextends: baseline\nsampler:\n  pool_size: 1\nrl_data:\n  shots: 2\n",
    "retrieved_pool_under_shots.yaml": "name: few_retrieved\nextends: baseline\ninfer:\n  pool: retrieved\n  retrieve_top_n: 2\n  shots: [1, 2, 3, 4]\n",
    "wrong_type.yaml": "name: wrong_type\nextends: baseline\nrce:\n  epochs: five\n",
    "truncated.yaml": "name: cut\nextends: baseline\ngrpo: {epochs: 3, kl_beta: 0.1\n",
}


def _pred_base() -> list[dict]:
    rows = []
    for i in range(3):
        rows.append({"question_id": 2000 + i, "query_index": i, "variant": "selector", "shot": 2,
                     "icd_ids": [i, i + 7], "icd_question_ids": [1000 + i, 1007 + i], "raw_generation": "yes\n",
                     "answer": "yes", "accuracy": 1.0 if i else 0.3})
    return rows


def predictions_corpus() -> dict[str, str]:
    base = _pred_base()

    def mutated(fn) -> str:
        rows = copy.deepcopy(base)
        fn(rows)
        return "".join(json.dumps(r) + "\n" for r in rows)

    text = mutated(lambda r: None)
    return {
        "truncated.jsonl": text[:-25],
        "wrong_types.jsonl": mutated(lambda r: (r[0].__setitem__("shot", "2"), r[2].__setitem__("accuracy", "high"))),
        "missing_fields.jsonl": mutated(lambda r: r[1].pop("accuracy")),
        "nan_accuracy.jsonl": mutated(lambda r: r[1].__setitem__("accuracy", math.nan)),
        "fewer_icds_than_shot.jsonl": mutated(lambda r: [row.__setitem__("shot", 4) for row in r]),
        "duplicate_question.jsonl": mutated(lambda r: r.append(copy.deepcopy(r[0]))),
    }


def checkpoint_corpus(dest: Path) -> None:
    """``other_shape``: weights of a hidden=8 selector under a meta that says hidden=16 (the meta of
    another run copied beside them); ``newer_schema``: a valid pair whose meta says version 3."""
    import torch

    from lever.config.schema import SelectorConfig
    from lever.selectors.checkpoint import save_checkpoint
    from lever.selectors.pointer import build_selector

    small = build_selector(4, SelectorConfig(hidden=8, layers=1, dropout=0.0), seed=0)
    big = build_selector(4, SelectorConfig(hidden=16, layers=1, dropout=0.0), seed=0)
    save_checkpoint(dest / "other_shape", small, plan="corpus", epoch=1, phase="rce")
    save_checkpoint(dest / "_big", big, plan="corpus", epoch=1, phase="rce")
    (dest / "other_shape.json").write_bytes((dest / "_big.json").read_bytes())
    for suffix in (".json", ".safetensors"):
        (dest / f"_big{suffix}").unlink()
    save_checkpoint(dest / "newer_schema", small, plan="corpus", epoch=1, phase="rce")
    meta = json.loads((dest / "newer_schema.json").read_text())
    meta["schema_version"] = 3
    (dest / "newer_schema.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    del torch


def main() -> None:
    for sub, files in (("rl-data", rl_corpus()), ("plan", PLANS), ("predictions", predictions_corpus())):
        d = HERE / sub
        d.mkdir(exist_ok=True)
        for name, text in files.items():
            (d / name).write_text(text, encoding="utf-8")
    d = HERE / "checkpoint"
    d.mkdir(exist_ok=True)
    checkpoint_corpus(d)


if __name__ == "__main__":
    main()
