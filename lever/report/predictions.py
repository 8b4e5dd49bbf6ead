"""Reading inference predictions (the ``infer`` artifact) for the report and ``lever compare``.

Accuracies are recomputed from ``predictions.jsonl`` (never taken from ``summary.json``) so a
report cannot disagree with the rows it summarizes.  Rows whose LVLM evaluation failed are kept
out of the means and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from lever.context import Unit
from lever.errors import StageError

#: fields of an evaluated row (a row with ``eval_failed: true`` needs only the first three)
REQUIRED = ("question_id", "variant", "shot", "icd_ids", "accuracy")


@dataclass
class Cell:
    """All predictions of one (variant, shot) over its shards."""

    variant: str
    shot: int
    rows: dict[int, dict] = field(default_factory=dict)  # question_id -> row (non-failed)
    failed: int = 0
    shards: int = 0
    shards_expected: int = 0
    skipped: str = ""  # why the cell was not evaluated (its GRPO epoch was never trained)

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def accuracy(self) -> float:
        """Mean VQA accuracy in percent (nan when empty)."""
        if not self.rows:
            return float("nan")
        return 100.0 * sum(r["accuracy"] for r in self.rows.values()) / len(self.rows)

    @property
    def complete(self) -> bool:
        return self.shards == self.shards_expected


def read_predictions(path: Path) -> Iterable[dict]:
    """Every row of a predictions file, or a StageError listing every problem (file, line, field):
    the checks of ``lever validate predictions`` (:mod:`lever.validation.predictions`)."""
    from lever.validation.predictions import read_predictions_checked

    yield from read_predictions_checked(path)


def collect(units: Iterable[tuple[Unit, Path]], variants: Iterable[str] | None = None) -> dict[tuple[str, int], Cell]:
    """Cells keyed (variant, shot) from ``(unit, dir)`` pairs of the infer stage."""
    wanted = set(variants) if variants is not None else None
    cells: dict[tuple[str, int], Cell] = {}
    for unit, d in units:
        variant, shot = unit.variant, unit.shot
        if wanted is not None and variant not in wanted:
            continue
        cell = cells.setdefault((variant, shot), Cell(variant, shot))
        cell.shards += 1
        cell.shards_expected = unit.of
        path = Path(d) / "predictions.jsonl"
        skipped = Path(d) / "skipped.json"
        if skipped.exists():
            cell.skipped = str(json.loads(skipped.read_text(encoding="utf-8")).get("reason") or "not evaluated")
        if not path.exists():
            raise StageError(f"{path}: predictions file missing from a committed infer artifact")
        for row in read_predictions(path):
            if row.get("eval_failed"):
                cell.failed += 1
                continue
            qid = int(row["question_id"])
            if qid in cell.rows:
                raise StageError(f"{path}: question_id {qid} appears twice for variant {variant} shot {shot}")
            cell.rows[qid] = row
    return cells
