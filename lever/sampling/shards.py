"""Sharding by query range and resumable JSONL output.

A shard writes one JSON line per query, in query order, into the stage's staging directory
(which survives a kill).  On restart we keep every complete line, drop a trailing partial line
(the process died mid-write), and continue with the next query.  Because every query's work is a
pure function of (config, query) -- per-query seeded RNGs, per-query LVLM batches -- the resumed
file is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from lever.errors import StageError


def shard_range(n_items: int, shard: int, of: int) -> range:
    """Contiguous, balanced query range of shard ``shard`` of ``of`` (shards may be empty)."""
    if of < 1 or not 0 <= shard < of:
        raise StageError(f"bad shard {shard} of {of}")
    return range(shard * n_items // of, (shard + 1) * n_items // of)


def dumps(obj: Any) -> str:
    """The one JSON line format of beams/RL data: compact, UTF-8, key order as built."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class ResumableJsonl:
    """Append-only JSONL whose complete lines are the finished queries.

    ``done`` holds the parsed complete lines found at open; a partial last line is cut off.
    Each appended line is flushed and fsynced, so a kill loses at most the line being written.
    """

    def __init__(self, path: Path, expected_ids: Optional[Iterable[int]] = None, id_field: str = "query_id") -> None:
        self.path = Path(path)
        self.done: list[dict] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        expected = list(expected_ids) if expected_ids is not None else None
        keep = 0
        if self.path.exists():
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1  # bytes of complete lines
            for lineno, raw in enumerate(data[:keep].splitlines(), start=1):
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise StageError(f"{self.path}:{lineno}: unreadable line in a partial shard ({e}); delete the file to restart") from None
                if expected is not None:
                    want = expected[len(self.done)] if len(self.done) < len(expected) else None
                    if obj.get(id_field) != want:
                        raise StageError(
                            f"{self.path}:{lineno}: field {id_field!r} is {obj.get(id_field)!r}, expected {want!r} "
                            "(a partial shard from another configuration?); delete the file to restart"
                        )
                self.done.append(obj)
            if keep != len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(keep)
                    f.flush()
                    os.fsync(f.fileno())
        self._fh = open(self.path, "ab")

    def append(self, obj: Any) -> None:
        self._fh.write((dumps(obj) + "\n").encode("utf-8"))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "ResumableJsonl":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
