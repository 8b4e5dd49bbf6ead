"""The judged-sequence cache of online GRPO: (query, ICD sequence, LVLM config) -> the LVLM's verdict.

Why a cache in the artifact store and not in the stage's own output: a sequence the selector
samples again (in a later round, epoch, resumed attempt, or another plan with the same LVLM and
data) must not cost another LVLM call, and a resumed run must train on exactly the rewards the
killed attempt saw.  Verdicts are a pure function of (dataset item, ICD ids, LVLM config), so they
are shared by every run whose namespace matches.

Layout: ``judged/{namespace}/q{query_id}.json`` = ``{"query_id", "p0", "verdicts": {"12,7": {...}}}``
(``p0``: the probability of the answer with no demonstration, what ``info_score`` subtracts).  One
document per query keeps reads and writes small on S3.  Writes merge into the stored document
(read, add what is new, write atomically), so two runs filling the same query lose nothing but,
at worst, an entry the other wrote in between -- which costs one repeated (identical) judgement,
never a wrong reward.  A document that cannot be read is treated as empty (and rewritten).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from lever.io import atomic_write_json

log = logging.getLogger(__name__)

PREFIX = "judged"


class JsonBackend(Protocol):
    """What the cache needs from a store (``lever.storage.store.Store`` has both)."""

    def get_json(self, key: str) -> Optional[Any]: ...

    def put_json(self, key: str, obj: Any) -> None: ...


class DirBackend:
    """A plain directory standing in for the store (a stage called without one, e.g. in tests)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def get_json(self, key: str) -> Optional[Any]:
        p = self.root / key
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

    def put_json(self, key: str, obj: Any) -> None:
        p = self.root / key
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(p, obj)


def namespace(lvlm_key: str, dataset_hash: str) -> str:
    """Cache namespace: the LVLM config (as in artifact keys) and the dataset artifact's hash.
    Rewards are *not* part of it: the cache holds verdicts, the plan's reward mode is applied after."""
    blob = json.dumps({"lvlm": lvlm_key, "dataset": dataset_hash}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def seq_key(icd_ids: Sequence[int]) -> str:
    return ",".join(str(int(i)) for i in icd_ids)


class JudgeCache:
    """In-memory view of the cached verdicts of the queries touched so far, flushed to the backend."""

    def __init__(self, backend: JsonBackend, ns: str) -> None:
        self.backend = backend
        self.ns = ns
        self._docs: dict[int, dict] = {}
        self._dirty: set[int] = set()
        self.hits = 0
        self.misses = 0

    def _key(self, query_id: int) -> str:
        return f"{PREFIX}/{self.ns}/q{int(query_id)}.json"

    def _load(self, query_id: int) -> dict:
        qid = int(query_id)
        doc = self._docs.get(qid)
        if doc is None:
            doc = self._read(qid) or {"query_id": qid, "p0": None, "verdicts": {}}
            self._docs[qid] = doc
        return doc

    def _read(self, qid: int) -> Optional[dict]:
        try:
            doc = self.backend.get_json(self._key(qid))
        except (ValueError, OSError) as e:  # a torn or foreign file: start the query over
            log.warning("judge cache %s unreadable (%s); re-judging", self._key(qid), e)
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("verdicts"), dict):
            return None
        return doc

    def p0(self, query_id: int) -> Optional[float]:
        v = self._load(query_id).get("p0")
        return None if v is None else float(v)

    def set_p0(self, query_id: int, value: float) -> None:
        self._load(query_id)["p0"] = float(value)
        self._dirty.add(int(query_id))

    def get(self, query_id: int, icd_ids: Sequence[int]) -> Optional[dict]:
        return self._load(query_id)["verdicts"].get(seq_key(icd_ids))

    def put(self, query_id: int, icd_ids: Sequence[int], verdict: dict) -> None:
        self._load(query_id)["verdicts"][seq_key(icd_ids)] = dict(verdict)
        self._dirty.add(int(query_id))

    def flush(self) -> int:
        """Write every query document changed since the last flush (merged with what is stored now);
        returns how many documents were written."""
        n = 0
        for qid in sorted(self._dirty):
            mine = self._docs[qid]
            stored = self._read(qid) or {"verdicts": {}}
            merged = {**stored["verdicts"], **mine["verdicts"]}
            p0 = mine.get("p0") if mine.get("p0") is not None else stored.get("p0")
            doc = {"query_id": qid, "p0": p0, "verdicts": merged}
            self.backend.put_json(self._key(qid), doc)
            self._docs[qid] = doc
            n += 1
        self._dirty.clear()
        return n
