"""Schema versions of the documents Lever writes and reads back (RL data, checkpoints, reports).

Why: RL data and checkpoints outlive the code that wrote them (the seeds lost plan 5+8 to last
month's RL data in a different shape).  Every such document carries ``schema_version``; a reader
calls :func:`upgrade` before looking at any other field, which

* refuses a document from a *newer* Lever with a message that says so (never a guess at fields
  it does not know), and
* migrates an *older* one step by step (0 -> 1 -> ...) through :data:`MIGRATIONS`, so the rest of
  the reader only ever sees the current shape.

Version 0 is "no ``schema_version`` field": what the reference project (and Lever before
versioning) wrote.  Its field names are listed in :data:`RL_V0_RENAMES` and
:data:`RL_V0_CANDIDATE_RENAMES`; a migration renames only when the old name is present and the new
one absent, so a current-shape document that merely lacks the version field passes unchanged.
A migration never invents a value a reward depends on: what cannot be derived is left missing for
the validator to report.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from lever.errors import StageError

#: the version each kind is written with (and the newest one this Lever reads)
CURRENT: dict[str, int] = {"rl_data": 1, "checkpoint": 1, "report": 1}

Migration = Callable[[dict], dict]


class SchemaVersionError(StageError):
    """A document's ``schema_version`` cannot be read by this Lever (newer, or not an integer)."""


# -- version 0 of the RL data (reference project field names) -----------------------------------

RL_V0_RENAMES: tuple[tuple[str, str], ...] = (
    ("candidate_pool", "pool"),
    ("pointer_candidates", "candidates"),
    ("answers", "gt_answers_raw"),
    ("qid", "query_id"),
)
RL_V0_CANDIDATE_RENAMES: tuple[tuple[str, str], ...] = (
    ("score", "beam_score"),
    ("pointer", "positions"),
    ("ids", "icd_ids"),
    ("gen_method", "source"),
    ("beam_rank", "rank"),
    ("vqa_correct", "correct"),
    ("correctness", "correct"),
    ("vqa_acc_score", "acc_score"),
    ("vqa_gt_prob", "gt_prob"),
    ("vqa_rel_score", "rel_score"),
    ("vqa_pred_answer", "pred_answer"),
    ("vqa_raw_generation", "raw_generation"),
)
#: reference names of candidate sources -> Lever's
RL_V0_SOURCES: dict[str, str] = {
    "beam": "infoscore_beam", "infoscore": "infoscore_beam", "sample": "v2_sample",
    "v2beam": "v2_beam", "sim": "retrieval", "similarity": "retrieval", "rand": "random",
}


def _rename(d: dict, pairs: tuple[tuple[str, str], ...]) -> None:
    for old, new in pairs:
        if old in d and new not in d:
            d[new] = d.pop(old)


def _rl_0_to_1(rec: dict) -> dict:
    """Reference-project RL record -> version 1 (see DESIGN.md artifact formats)."""
    _rename(rec, RL_V0_RENAMES)
    if "gt_answers" not in rec and isinstance(rec.get("gt_answers_raw"), list):
        from lever.metrics import normalize_answer

        rec["gt_answers"] = [normalize_answer(a) if isinstance(a, str) else a for a in rec["gt_answers_raw"]]
    pool = rec.get("pool")
    for cand in rec.get("candidates") or []:
        if not isinstance(cand, dict):
            continue  # the validator reports it
        _rename(cand, RL_V0_CANDIDATE_RENAMES)
        src = cand.get("source")
        if isinstance(src, str) and src in RL_V0_SOURCES:
            cand["source"] = RL_V0_SOURCES[src]
        # the reference stored correctness as 0/1
        if type(cand.get("correct")) is int and cand["correct"] in (0, 1):
            cand["correct"] = bool(cand["correct"])
        if isinstance(pool, list):
            pos, ids = cand.get("positions"), cand.get("icd_ids")
            if ids is None and isinstance(pos, list) and all(type(p) is int and 0 <= p < len(pool) for p in pos):
                cand["icd_ids"] = [pool[p] for p in pos]
            elif pos is None and isinstance(ids, list) and all(i in pool for i in ids):
                cand["positions"] = [pool.index(i) for i in ids]
        # the reference had no separate InfoScore column: for its InfoScore beams the beam score is
        # the summed InfoScore; other sources had none (no reward mode reads info_score)
        if "info_score" not in cand and "beam_score" in cand:
            cand["info_score"] = cand["beam_score"] if cand.get("source") == "infoscore_beam" else 0.0
        cand.setdefault("eval_failed", False)
    rec["schema_version"] = 1
    return rec


# -- version 0 of checkpoints and reports --------------------------------------------------------

CKPT_V0_ARCH_RENAMES: tuple[tuple[str, str], ...] = (
    ("emb_dim", "embed_dim"),
    ("d_model", "hidden"),
    ("hidden_dim", "hidden"),
    ("num_layers", "layers"),
    ("n_layers", "layers"),
    ("num_heads", "heads"),
)


def _ckpt_0_to_1(meta: dict) -> dict:
    """Unversioned checkpoint meta: arch keys of the reference config, no ``kind``/``layout``."""
    meta.setdefault("kind", "pointer")
    meta.setdefault("layout", "v3")
    if isinstance(meta.get("arch"), dict):
        _rename(meta["arch"], CKPT_V0_ARCH_RENAMES)
    meta["schema_version"] = 1
    return meta


def _report_0_to_1(doc: dict) -> dict:
    """Reports before versioning had the same fields; only the marker is added."""
    doc["schema_version"] = 1
    return doc


#: (kind, from_version) -> function producing version from_version + 1
MIGRATIONS: dict[tuple[str, int], Migration] = {
    ("rl_data", 0): _rl_0_to_1,
    ("checkpoint", 0): _ckpt_0_to_1,
    ("report", 0): _report_0_to_1,
}


def version_of(doc: dict, where: str = "") -> int:
    """The document's ``schema_version`` (0 when absent); anything but a non-negative int is refused."""
    v = doc.get("schema_version", 0)
    if type(v) is not int or v < 0:
        raise SchemaVersionError(f"{where}: field 'schema_version': expected a non-negative integer, got {v!r}")
    return v


def check_supported(kind: str, version: int, where: str = "") -> None:
    """Raise the "newer Lever" error when ``version`` is beyond what this Lever reads."""
    supported = CURRENT[kind]
    if version > supported:
        raise SchemaVersionError(
            f"{where}: field 'schema_version': {version} was written by a newer Lever (schema_version "
            f"{version} > supported {supported} for {kind.replace('_', ' ')}); upgrade lever"
        )


def upgrade(doc: Any, kind: str, where: str = "") -> Any:
    """``doc`` in the current shape of ``kind`` (a migrated copy when it was older).

    ``where`` ("FILE: line N") prefixes every message.  Non-dict documents are returned as they
    are: the caller's validator reports them with its own wording.
    """
    if kind not in CURRENT:
        raise KeyError(f"unknown document kind {kind!r}; known: {', '.join(CURRENT)}")
    if not isinstance(doc, dict):
        return doc
    v = version_of(doc, where)
    check_supported(kind, v, where)
    if v == CURRENT[kind]:
        return doc
    out = copy.deepcopy(doc)
    while v < CURRENT[kind]:
        step = MIGRATIONS.get((kind, v))
        if step is None:
            raise SchemaVersionError(f"{where}: field 'schema_version': no migration from {kind} version {v}")
        out = step(out)
        v += 1
    return out


__all__ = ["CURRENT", "MIGRATIONS", "SchemaVersionError", "upgrade", "version_of", "check_supported"]
