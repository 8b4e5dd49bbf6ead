"""Validator of the infer artifact's ``predictions.jsonl`` (DESIGN.md artifact formats).

Shared by ``lever validate predictions`` and the report's reader
(:func:`lever.report.predictions.read_predictions`), so a file the summarizer would refuse is
refused the same way beforehand.  Besides types it checks the one thing the reference code got
silently wrong: a row of shot S must hold S distinct ICD ids (its "K=2 pool" bug ran shots 3 and 4
with 2 ICDs).  Rows with ``eval_failed: true`` only need their identity fields: they are kept,
excluded from accuracy, and counted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lever.errors import StageError

#: fields every row needs, and the extra ones a row whose evaluation succeeded needs
IDENTITY = ("question_id", "variant", "shot")
EVALUATED = ("icd_ids", "accuracy")


def _is_int(v: Any) -> bool:
    return type(v) is int


def _row_problems(row: Any, where: str) -> list[str]:
    if not isinstance(row, dict):
        return [f"{where}: field '<row>': expected a JSON object, got {type(row).__name__}"]
    out: list[str] = []

    def bad(field: str, msg: str) -> None:
        out.append(f"{where}: field '{field}': {msg}")

    failed = row.get("eval_failed", False)
    if not isinstance(failed, bool):
        bad("eval_failed", f"expected a boolean, got {failed!r}")
        failed = False
    for f in IDENTITY + (() if failed else EVALUATED):
        if f not in row:
            bad(f, "missing")
    if "question_id" in row and not _is_int(row["question_id"]):
        bad("question_id", f"expected an integer, got {row['question_id']!r}")
    if "query_index" in row and not (_is_int(row["query_index"]) and row["query_index"] >= 0):
        bad("query_index", f"expected a non-negative integer, got {row['query_index']!r}")
    if "variant" in row and not (isinstance(row["variant"], str) and row["variant"]):
        bad("variant", f"expected a non-empty string, got {row['variant']!r}")
    shot = row.get("shot")
    if "shot" in row and not (_is_int(shot) and shot >= 1):
        bad("shot", f"expected a positive integer, got {shot!r}")
        shot = None
    for f in ("raw_generation", "answer"):
        if f in row and not isinstance(row[f], str):
            bad(f, f"expected a string, got {type(row[f]).__name__}")
    ids = row.get("icd_ids")
    if "icd_ids" in row:
        if not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids):
            bad("icd_ids", f"expected a list of non-negative integers, got {ids!r}")
        else:
            if len(set(ids)) != len(ids):
                bad("icd_ids", f"repeated ICD id in {ids}")
            if _is_int(shot) and not failed and len(ids) != shot:
                bad("icd_ids", f"{len(ids)} ICD ids for shot {shot} (a pool too small for the shots asked?)")
            qids = row.get("icd_question_ids")
            if qids is not None and (not isinstance(qids, list) or len(qids) != len(ids)):
                bad("icd_question_ids", f"expected a list of {len(ids)} question ids, got {qids!r}")
    if not failed and "accuracy" in row:
        acc = row["accuracy"]
        if isinstance(acc, bool) or not isinstance(acc, (int, float)):
            bad("accuracy", f"expected a number, got {acc!r}")
        elif not math.isfinite(acc) or not 0.0 <= acc <= 1.0:
            bad("accuracy", f"must be a finite number in [0, 1], got {acc!r}")
    return out


def check_predictions(path: Path | str) -> tuple[list[dict], list[str]]:
    """(valid rows, problems) of one predictions file; every problem names file, line and field."""
    path = Path(path)
    rows: list[dict] = []
    problems: list[str] = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], [f"{path}: predictions file not found"]
    seen: dict[tuple, int] = {}
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            row = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            hint = " (truncated last line?)" if lineno == len(lines) and not data.endswith(b"\n") else ""
            problems.append(f"{where}: invalid JSON ({exc}){hint}")
            continue
        found = _row_problems(row, where)
        if found:
            problems.extend(found)
            continue
        ident = (row["variant"], row["shot"], row["question_id"])
        if ident in seen:
            problems.append(f"{where}: field 'question_id': {row['question_id']} appears twice for variant "
                            f"{row['variant']} shot {row['shot']} (first at line {seen[ident]})")
            continue
        seen[ident] = lineno
        rows.append(row)
    return rows, problems


def _reject_constant(name: str) -> Any:
    """JSON has no NaN/Infinity; Python's json would accept them silently."""
    raise ValueError(f"non-finite constant {name} is not JSON")


def read_predictions_checked(path: Path | str) -> list[dict]:
    """All rows, or a StageError listing every problem (what the report's reader raises)."""
    rows, problems = check_predictions(path)
    if problems:
        raise StageError(format_problems(problems))
    return rows


def format_problems(problems: list[str], limit: int = 20) -> str:
    """One message for a StageError: the first problem, then the rest indented."""
    head = problems[0]
    rest = problems[1:limit]
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return head + "".join(f"\n  {p}" for p in rest) + more + (
        f"\n  ({len(problems)} problems)" if len(problems) > 1 else "")
