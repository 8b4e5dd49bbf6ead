"""``lever store gc``: find and remove what killed or failed runs leave behind in a store.

What can pile up: staging directories (S3: snapshots) of units whose run died and never came
back, quarantined artifacts (kept on purpose for inspection), and leases of holders that died
(S3; a local lock dies with its process, only its files stay).  None of it is ever read as a
result, so removing it is safe -- except a staging directory a runner is using right now, which
is why removal of a staging directory happens only while holding the unit's lease (the runner
that wants it waits a moment) and never when a live lease names it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Optional

from lever.errors import StageError
from lever.storage.lease import LeaseRecord, owner_info
from lever.storage.store import Leftover, StagingBusy, Store

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d`` (a bare number is seconds) -> seconds."""
    m = _AGE.match(text or "")
    if not m:
        raise StageError(f"--older-than {text!r}: expected a number with a unit s, m, h or d (e.g. 12h, 7d)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


@dataclass
class GcItem:
    item: Leftover
    age_s: float
    lease: Optional[LeaseRecord] = None  # for kind "lease": the stale lease to remove (that version)
    kept: str = ""  # why it stays although old enough ("" = removable)


def plan_gc(store: Store, older_than_s: float, now: Optional[float] = None) -> list[GcItem]:
    """Everything at least ``older_than_s`` old: removable items, and old ones kept with the reason.
    Stale leases come first, so removing one frees its unit's old staging in the same pass."""
    now = time.time() if now is None else now
    leases = store.leases().list()
    live = {rec.key: rec for rec, alive in leases if alive}
    out = []
    for rec, alive in leases:
        age = now - rec.renewed
        # a lease is stale when its holder is gone (local) or stopped renewing for 2 x its ttl (S3)
        if alive or age < older_than_s or (rec.ttl_s > 0 and age < 2 * rec.ttl_s):
            continue
        out.append(GcItem(Leftover("lease", rec.key, rec.renewed, 0, f"lease of {store.location(rec.key)}"), age,
                          lease=rec))
    for it in store.leftovers():
        age = now - it.newest
        if age < older_than_s:
            continue
        kept = ""
        if it.kind == "staging" and it.name in live:
            kept = f"its unit is being built ({live[it.name].who()})"
        out.append(GcItem(it, age, kept=kept))
    return out


def apply_gc(store: Store, items: list[GcItem]) -> list[tuple[GcItem, str]]:
    """Remove the removable items; returns (item, outcome) with outcome ``removed`` or why not."""
    backend = store.leases()
    out = []
    for g in items:
        if g.kept:
            out.append((g, f"kept: {g.kept}"))
            continue
        if g.item.kind == "lease":
            assert g.lease is not None
            out.append((g, "removed" if backend.remove_stale(g.lease) else "kept: renewed or taken meanwhile"))
        elif g.item.kind == "staging":
            rec = LeaseRecord.new(g.item.name, {**owner_info(), "purpose": "lever store gc"}, 60.0)
            got, holder = backend.try_acquire(rec)
            if not got:
                out.append((g, "kept: its unit is being built" + (f" ({holder.who()})" if holder else "")))
                continue
            try:
                store.remove_leftover(g.item)
                out.append((g, "removed"))
            except StagingBusy:
                out.append((g, "kept: its staging directory is in use on this machine"))
            finally:
                backend.release(rec)
        else:
            store.remove_leftover(g.item)
            out.append((g, "removed"))
    return out
