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

from lever.errors import StageError
from lever.versioning import SchemaVersionError, upgrade

SOURCES: tuple[str, ...] = ("infoscore_beam", "v2_beam", "v2_sample", "retrieval", "random")
_QUERY_INT = ("query_id", "question_id", "image_id")
_CAND_FLOAT = ("beam_score", "acc_score", "gt_prob", "rel_score", "info_score")


SCHEMA_VERSION = 1
MAX_LISTED = 50


class _Bad(Exception):
    """A field problem already recorded; stops checking the rest of that candidate/record."""


class _Loc:
    """Where we are (file, line, query id) and the problems found so far."""

    def __init__(self, path: Path, line: int, problems: list[str]) -> None:
        self.path, self.line, self.qid, self.problems = path, line, None, problems

    def fail(self, field: str, msg: str) -> _Bad:
        q = f", query_id {self.qid}" if self.qid is not None else ""
        self.problems.append(f"{self.path}: line {self.line}{q}: field {field!r}: {msg}")
        return _Bad()


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


def _each(loc: _Loc, *checks: Any) -> bool:
    """Run independent field checks, recording every failure; True when all passed."""
    ok = True
    for check in checks:
        try:
            check()
        except _Bad:
            ok = False
    return ok


def _check_candidate(loc: _Loc, c: Any, i: int, pool: Optional[list[int]], shots: Optional[int]) -> Optional[bool]:
    """Validate candidate ``i``; returns its eval_failed flag, or None when it has problems."""
    pre = f"candidates[{i}]."
    if not isinstance(c, dict):
        loc.fail(f"candidates[{i}]", "expected an object")
        return None

    def ids_and_positions() -> None:
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
        if pool is None:
            return
        for p, icd in zip(pos, ids):
            if not 0 <= p < len(pool):
                raise loc.fail(pre + "positions", f"position {p} outside the pool of {len(pool)}")
            if pool[p] != icd:
                raise loc.fail(pre + "icd_ids", f"icd {icd} is not pool[{p}]={pool[p]}")

    def source() -> None:
        src = _require(loc, c, "source", pre)
        if src not in SOURCES:
            raise loc.fail(pre + "source", f"{src!r} is not one of {', '.join(SOURCES)}")

    ef = c.get("eval_failed", False)
    if not isinstance(ef, bool):
        loc.fail(pre + "eval_failed", f"expected a boolean, got {ef!r}")
        return None
    ok = _each(loc, ids_and_positions, source)
    if ef:  # the verdict fields of a failed evaluation are meaningless: not checked, not used
        return True if ok else None

    def correct() -> None:
        if not isinstance(_require(loc, c, "correct", pre), bool):
            raise loc.fail(pre + "correct", f"expected a boolean, got {c['correct']!r}")

    checks = [lambda: _int(loc, pre + "rank", _require(loc, c, "rank", pre)), correct]
    checks += [lambda f=f: _num(loc, pre + f, _require(loc, c, f, pre)) for f in _CAND_FLOAT]
    checks += [lambda f=f: _str(loc, pre + f, c.get(f, "")) for f in ("raw_generation", "pred_answer")]
    return False if _each(loc, *checks) and ok else None


def _check_record(rec: Any, loc: _Loc, shots: Optional[int]) -> Optional[dict]:
    """Validate one parsed line, recording every problem; the cleaned record, or None if bad."""
    if not isinstance(rec, dict):
        loc.fail("<record>", f"expected a JSON object, got {type(rec).__name__}")
        return None
    qid = rec.get("query_id")
    if isinstance(qid, int) and not isinstance(qid, bool):
        loc.qid = qid
    n_before = len(loc.problems)

    # a newer version is refused (field checks would only add noise); version 0 (the reference
    # project's unversioned records) is migrated to the current shape first (lever.versioning)
    try:
        rec = upgrade(rec, "rl_data", f"{loc.path}: line {loc.line}"
                      + (f", query_id {loc.qid}" if loc.qid is not None else ""))
    except SchemaVersionError as exc:
        loc.problems.append(str(exc))
        return None
    qid = rec.get("query_id")
    if isinstance(qid, int) and not isinstance(qid, bool):
        loc.qid = qid
    pool_box: list[Optional[list[int]]] = [None]

    def pool() -> None:
        p = _int_list(loc, "pool", _require(loc, rec, "pool"))
        if not p:
            raise loc.fail("pool", "empty candidate pool")
        if len(set(p)) != len(p):
            raise loc.fail("pool", "repeated ids in the pool")
        if any(x < 0 for x in p):
            raise loc.fail("pool", "negative id")
        pool_box[0] = p

    _each(loc, *[lambda f=f: _int(loc, f, _require(loc, rec, f)) for f in _QUERY_INT],
          lambda: _str(loc, "question", _require(loc, rec, "question")),
          lambda: _str_list(loc, "gt_answers_raw", _require(loc, rec, "gt_answers_raw")),
          lambda: _str_list(loc, "gt_answers", _require(loc, rec, "gt_answers")), pool)
    cands = rec.get("candidates")
    if not isinstance(cands, list) or not cands:
        loc.fail("candidates", "missing" if "candidates" not in rec
                 else "expected a non-empty list (a group needs >= 1 candidate)")
        return None
    seq_len = shots
    if seq_len is None and isinstance(cands[0], dict) and isinstance(cands[0].get("icd_ids"), list):
        seq_len = len(cands[0]["icd_ids"])
    p = pool_box[0]
    if p is not None and seq_len is not None and len(p) < seq_len:
        loc.fail("pool", f"pool of {len(p)} is smaller than the {seq_len} shots of its sequences")
        p = None
    kept, failed = [], 0
    for i, c in enumerate(cands):
        flag = _check_candidate(loc, c, i, p, shots)
        if flag is True:
            failed += 1
        elif flag is False:
            kept.append(c)
    if len(loc.problems) > n_before:
        return None
    out = dict(rec)
    out["candidates"] = kept
    out["n_eval_failed"] = failed
    return out


def check_rl_data(paths: Iterable[Path | str]) -> tuple[list[dict], list[str]]:
    """(valid records, problems): every problem of every line, each naming file, line, field and
    query id.  ``lever validate rl-data`` prints the list; :func:`read_rl_data` raises on it."""
    records: list[dict] = []
    problems: list[str] = []
    seen: dict[int, str] = {}
    shots: Optional[int] = None
    for p in paths:
        p = Path(p)
        path = p / "rl_data.jsonl" if p.is_dir() else p
        if not path.exists():
            problems.append(f"{path}: RL data file not found")
            continue
        with path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                loc = _Loc(path, lineno, problems)
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append(f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})")
                    continue
                rec = _check_record(raw, loc, shots)
                if isinstance(raw, dict) and loc.qid is not None:
                    if loc.qid in seen:
                        loc.fail("query_id", f"duplicate query id (first at {seen[loc.qid]})")
                        continue
                    seen[loc.qid] = f"{path}: line {lineno}"
                if rec is None:
                    continue
                if shots is None and rec["candidates"]:
                    shots = len(rec["candidates"][0]["icd_ids"])
                records.append(rec)
    return records, problems


def read_rl_data(paths: Iterable[Path | str]) -> list[dict]:
    """All records of the given JSONL files (or directories holding ``rl_data.jsonl``), validated.

    Any problem raises one StageError listing every problem (file, line, field, query id); duplicate
    query ids (within or across shards) and sequences of differing length are problems too.
    Records keep the file order; candidates with ``eval_failed`` are dropped from their group and
    counted in ``n_eval_failed``.
    """
    records, problems = check_rl_data(paths)
    if problems:
        listed = problems[:MAX_LISTED]
        more = [f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else []
        tail = [f"({len(problems)} problems)"] if len(problems) > 1 else []
        raise StageError("\n".join(listed + more + tail))
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
