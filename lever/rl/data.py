"""Reader/validator of the RL data (``rl_data.jsonl`` shards, DESIGN.md artifact formats).

Every record is checked before training starts, because a bad value found mid-epoch (a NaN
reward, an ICD outside the pool) used to surface as a NaN loss hours later.  Errors are
StageErrors naming file, line, field and query id.  Candidates with ``eval_failed: true`` are kept
out of the group (their verdict fields are meaningless) and counted in ``n_eval_failed``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from lever.pipeline.context import StageError

SOURCES: tuple[str, ...] = ("infoscore_beam", "v2_beam", "v2_sample", "retrieval", "random")
_QUERY_INT = ("query_id", "question_id", "image_id")
_CAND_FLOAT = ("beam_score", "acc_score", "gt_prob", "rel_score", "info_score")


class _Loc:
    def __init__(self, path: Path, line: int) -> None:
        self.path, self.line, self.qid = path, line, None

    def fail(self, field: str, msg: str) -> StageError:
        q = f", query_id {self.qid}" if self.qid is not None else ""
        return StageError(f"{self.path}: line {self.line}{q}: field {field!r}: {msg}")


def _int(loc: _Loc, field: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise loc.fail(field, f"expected an integer, got {v!r}")
    return v


def _num(loc: _Loc, field: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise loc.fail(field, f"expected a number, got {v!r}")
    if not math.isfinite(v):
        raise loc.fail(field, f"not finite ({v})")
    return float(v)


def _str(loc: _Loc, field: str, v: Any) -> str:
    if not isinstance(v, str):
        raise loc.fail(field, f"expected a string, got {type(v).__name__}")
    return v


def _int_list(loc: _Loc, field: str, v: Any) -> list[int]:
    if not isinstance(v, list):
        raise loc.fail(field, f"expected a list of integers, got {type(v).__name__}")
    return [_int(loc, field, x) for x in v]


def _str_list(loc: _Loc, field: str, v: Any) -> list[str]:
    if not isinstance(v, list):
        raise loc.fail(field, f"expected a list of strings, got {type(v).__name__}")
    return [_str(loc, field, x) for x in v]


def _require(loc: _Loc, obj: dict, field: str, prefix: str = "") -> Any:
    if field not in obj:
        raise loc.fail(prefix + field, "missing")
    return obj[field]


def validate_record(rec: Any, loc: _Loc, shots: Optional[int] = None) -> dict:
    """Check one parsed line; returns the record with failed candidates removed."""
    if not isinstance(rec, dict):
        raise loc.fail("<record>", f"expected a JSON object, got {type(rec).__name__}")
    qid = _require(loc, rec, "query_id")
    loc.qid = qid
    for f in _QUERY_INT:
        _int(loc, f, _require(loc, rec, f))
    sv = rec.get("schema_version", 1)
    if sv != 1:
        raise loc.fail("schema_version", f"unsupported version {sv!r} (this reader knows 1)")
    _str(loc, "question", _require(loc, rec, "question"))
    _str_list(loc, "gt_answers_raw", _require(loc, rec, "gt_answers_raw"))
    _str_list(loc, "gt_answers", _require(loc, rec, "gt_answers"))
    pool = _int_list(loc, "pool", _require(loc, rec, "pool"))
    if not pool:
        raise loc.fail("pool", "empty candidate pool")
    if len(set(pool)) != len(pool):
        raise loc.fail("pool", "repeated ids in the pool")
    if any(p < 0 for p in pool):
        raise loc.fail("pool", "negative id")
    cands = _require(loc, rec, "candidates")
    if not isinstance(cands, list) or not cands:
        raise loc.fail("candidates", "expected a non-empty list (a group needs >= 1 candidate)")
    kept, failed = [], 0
    for i, c in enumerate(cands):
        pre = f"candidates[{i}]."
        if not isinstance(c, dict):
            raise loc.fail(f"candidates[{i}]", "expected an object")
        ids = _int_list(loc, pre + "icd_ids", _require(loc, c, "icd_ids", pre))
        pos = _int_list(loc, pre + "positions", _require(loc, c, "positions", pre))
        if not ids:
            raise loc.fail(pre + "icd_ids", "empty sequence")
        if len(ids) != len(pos):
            raise loc.fail(pre + "positions", f"{len(pos)} positions for {len(ids)} icd_ids")
        if shots is not None and len(ids) != shots:
            raise loc.fail(pre + "icd_ids", f"sequence of length {len(ids)}; the data's sequences have length {shots}")
        if len(set(ids)) != len(ids):
            raise loc.fail(pre + "icd_ids", f"repeated ICD in one sequence {ids}")
        for p, icd in zip(pos, ids):
            if not 0 <= p < len(pool):
                raise loc.fail(pre + "positions", f"position {p} outside the pool of {len(pool)}")
            if pool[p] != icd:
                raise loc.fail(pre + "icd_ids", f"icd {icd} is not pool[{p}]={pool[p]}")
        ef = c.get("eval_failed", False)
        if not isinstance(ef, bool):
            raise loc.fail(pre + "eval_failed", f"expected a boolean, got {ef!r}")
        src = _require(loc, c, "source", pre)
        if src not in SOURCES:
            raise loc.fail(pre + "source", f"{src!r} is not one of {', '.join(SOURCES)}")
        if ef:
            failed += 1
            continue
        _int(loc, pre + "rank", _require(loc, c, "rank", pre))
        for f in _CAND_FLOAT:
            _num(loc, pre + f, _require(loc, c, f, pre))
        if not isinstance(_require(loc, c, "correct", pre), bool):
            raise loc.fail(pre + "correct", f"expected a boolean, got {c['correct']!r}")
        _str(loc, pre + "raw_generation", c.get("raw_generation", ""))
        _str(loc, pre + "pred_answer", c.get("pred_answer", ""))
        kept.append(c)
    out = dict(rec)
    out["candidates"] = kept
    out["n_eval_failed"] = failed
    return out


def read_rl_data(paths: Iterable[Path | str]) -> list[dict]:
    """All records of the given JSONL files (or directories holding ``rl_data.jsonl``), validated.

    Duplicate query ids (within or across shards) and sequences of differing length are errors.
    Records keep the file order; the caller sorts as needed.
    """
    records: list[dict] = []
    seen: dict[int, str] = {}
    shots: Optional[int] = None
    files = []
    for p in paths:
        p = Path(p)
        files.append(p / "rl_data.jsonl" if p.is_dir() else p)
    for path in files:
        if not path.exists():
            raise StageError(f"{path}: RL data file not found")
        with path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                loc = _Loc(path, lineno)
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise StageError(f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                rec = validate_record(rec, loc, shots)
                if shots is None:
                    shots = len(rec["candidates"][0]["icd_ids"]) if rec["candidates"] else None
                q = rec["query_id"]
                if q in seen:
                    raise loc.fail("query_id", f"duplicate query id (first at {seen[q]})")
                seen[q] = f"{path}: line {lineno}"
                records.append(rec)
    return records


def rl_data_stats(records: list[dict]) -> dict[str, Any]:
    """Counts the trainers log: queries, candidates, excluded (eval_failed) candidates, group sizes."""
    sizes = [len(r["candidates"]) for r in records]
    return {
        "queries": len(records),
        "candidates": sum(sizes),
        "eval_failed": sum(r.get("n_eval_failed", 0) for r in records),
        "empty_groups": sum(1 for s in sizes if s == 0),
        "min_group": min(sizes) if sizes else 0,
        "max_group": max(sizes) if sizes else 0,
    }
