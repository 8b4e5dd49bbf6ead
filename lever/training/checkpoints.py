"""Finding and choosing among a training stage's ``{prefix}_epoch{N}`` checkpoints.

Used by select-checkpoint, by train-grpo (which RCE epoch to start from) and by plan9's
curriculum (phase 2 starts from phase 1's selected epoch).  A ``stopped.json`` whose reason asks
for a rollback (the divergence guard's ``"rollback: "`` prefix) makes the lowest-val-loss epoch up
to the stop the stage's result, whatever the strategy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from lever.errors import StageError

ROLLBACK_PREFIX = "rollback: "


def read_metrics(dir: Path) -> list[dict]:
    path = Path(dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise StageError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
    return rows


def available_epochs(dir: Path, prefix: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(prefix)}_epoch(\d+)\.json$")
    out = []
    for p in Path(dir).glob(f"{prefix}_epoch*.json"):
        m = pat.match(p.name)
        if m and p.with_suffix(".safetensors").exists():
            out.append(int(m.group(1)))
    return sorted(out)


def stopped_info(dir: Path) -> Optional[dict]:
    p = Path(dir) / "stopped.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


def choose_epoch(rows_by_epoch: dict[int, dict], epochs: list[int], strategy: str, fixed: Optional[int] = None,
                 stopped: Optional[dict] = None) -> tuple[int, str]:
    """(epoch, reason) among ``epochs`` (those with a checkpoint)."""
    if not epochs:
        raise StageError("no checkpoint to choose from")
    if stopped and str(stopped.get("reason", "")).startswith(ROLLBACK_PREFIX):
        upto = [e for e in epochs if e <= int(stopped.get("epoch", epochs[-1]))] or epochs
        scored = [(rows_by_epoch.get(e, {}).get("val_loss"), e) for e in upto]
        scored = [(v, e) for v, e in scored if isinstance(v, (int, float))]
        if scored:
            v, e = min(scored)
            return e, f"rollback after a guard stop at epoch {stopped.get('epoch')}: lowest val_loss {v:.5g} (epoch {e})"
    if strategy == "last":
        return epochs[-1], f"last epoch ({epochs[-1]})"
    if strategy == "epoch":
        if fixed not in epochs:
            raise StageError(f"checkpoint.epoch={fixed} has no checkpoint; available epochs: {epochs}")
        return int(fixed), f"fixed epoch {fixed}"
    key, better = ("val_loss", min) if strategy == "val_loss" else (
        ("heldout_reward", max) if strategy == "heldout_reward" else ("val_reward", max))
    scored = [(rows_by_epoch.get(e, {}).get(key), e) for e in epochs]
    scored = [(v, e) for v, e in scored if isinstance(v, (int, float))]
    if not scored:
        return epochs[-1], f"no {key} recorded (no validation queries); fell back to the last epoch ({epochs[-1]})"
    # ties go to the earliest epoch
    v, e = min(scored) if better is min else max(scored, key=lambda t: (t[0], -t[1]))
    word = "lowest" if better is min else "highest"
    return e, f"{word} {key} {v:.5g} at epoch {e} of {len(epochs)} candidates"


def result_epoch(dir: Path, prefix: str, strategy: str = "last", fixed: Optional[int] = None) -> Optional[int]:
    """The epoch a downstream stage should take from ``dir`` (None when there is none)."""
    epochs = available_epochs(dir, prefix)
    if not epochs:
        return None
    rows = {int(r["epoch"]): r for r in read_metrics(dir) if "epoch" in r}
    return choose_epoch(rows, epochs, strategy, fixed, stopped_info(dir))[0]


def rows_by_epoch(dir: Path) -> dict[int, dict[str, Any]]:
    return {int(r["epoch"]): r for r in read_metrics(dir) if "epoch" in r}
