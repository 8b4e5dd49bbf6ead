"""Unit leases on S3: one object per unit, every change a conditional write on its ETag.

``.leases/{key}.json`` is created with ``If-None-Match: *`` (fails with 412 when another runner
holds the unit), renewed with ``If-Match: <ETag the holder last wrote>`` (fails once a waiter took
it over), taken over by a waiter with ``If-Match: <ETag of the expired lease>`` (fails when the
holder renewed or another waiter was first) and released with a conditional delete.  AWS S3
supports all four (conditional writes since 2024, conditional deletes on general purpose buckets
since 2025); moto's server (the tests) implements them too.

Why every operation re-reads after a conflict: a conditional request whose answer was lost on the
network is retried, and the retry then fails its own precondition.  The lease's token (and
sequence number) tell "our earlier attempt succeeded" from "someone else's write".
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable, Optional, Protocol

from lever.storage.lease import LeaseBackend, LeaseError, LeaseRecord, LeaseSettings
from lever.storage.s3_client import conflict, is_not_found, make_client, unsupported


class LeaseBucket(Protocol):
    """What the leases use of the S3 store that opens them (``lever.storage.s3.S3Store``):
    declared here so the two modules do not import each other."""

    bucket: str
    prefix: str
    url: str

    @property
    def client(self) -> Any: ...

    def _obj(self, key: str, rel: str = "") -> str: ...

    def _retry(self, what: str, fn: Callable[[], Any], *, not_found: Any = ...) -> Any: ...

    def _list(self, name_prefix: str) -> dict[str, int]: ...

log = logging.getLogger("lever.lease")

_WRITTEN, _CONFLICT, _MISSING = "written", "conflict", "missing"


class S3Leases(LeaseBackend):
    dies_with_holder = False

    def __init__(self, store: LeaseBucket, settings: Optional[LeaseSettings] = None):
        self.store = store
        self.settings = settings or LeaseSettings.from_env()
        self._beat_client: Any = None
        self._checked = False

    # -- plumbing ---------------------------------------------------------------------------
    def _name(self, key: str) -> str:
        return self.store._obj(".leases/" + key) + ".json"

    @property
    def _base(self) -> str:
        return "/".join(p for p in (self.store.prefix, ".leases") if p) + "/"

    def _beat(self) -> Any:
        """A client for heartbeats: short timeouts, one attempt (the next beat is the retry), so a
        hung connection cannot hold a beat past the lease's ttl."""
        if self._beat_client is None:
            hb = self.settings.heartbeat_s
            self._beat_client = make_client(connect_timeout=max(1.0, min(5.0, hb)), read_timeout=max(2.0, hb), attempts=1)
        return self._beat_client

    def _write(self, client: Any, name: str, body: bytes, *, if_match: Optional[str] = None,
               create: bool = False) -> tuple[str, Optional[str]]:
        """One conditional PUT: (written, new ETag) | (conflict, None) | (missing, None)."""
        kw: dict = {"IfNoneMatch": "*"} if create else {"IfMatch": if_match}
        try:
            resp = client.put_object(Bucket=self.store.bucket, Key=name, Body=body, ContentType="application/json", **kw)
        except Exception as exc:
            if conflict(exc):
                return _CONFLICT, None
            if is_not_found(exc):
                return _MISSING, None
            raise unsupported(exc, "If-None-Match" if create else "If-Match") or exc
        return _WRITTEN, resp.get("ETag")

    def _retried(self, what: str, fn: Any) -> Any:
        return self.store._retry(what, fn)

    def _check_support(self) -> None:
        """Once per process: an endpoint that silently ignores conditional headers would let two
        runners hold one lease, so prove it enforces them before relying on it."""
        if self._checked:
            return
        name = f"{self._base}.probe-{uuid.uuid4().hex}"
        client = self.store.client
        try:
            first, etag = self._retried("probing conditional writes", lambda: self._write(client, name, b"1", create=True))
            again, _ = self._retried("probing conditional writes", lambda: self._write(client, name, b"2", create=True))
            stale, _ = self._retried("probing conditional writes",
                                     lambda: self._write(client, name, b"3", if_match='"00000000000000000000000000000000"'))
        finally:
            self._retried("removing the probe", lambda: client.delete_object(Bucket=self.store.bucket, Key=name))
        if first != _WRITTEN or again != _CONFLICT or stale != _CONFLICT:
            raise LeaseError(f"{self.store.url}: the S3 endpoint ignores conditional writes (If-None-Match: * / "
                             "If-Match were not enforced); Lever needs them to keep concurrent runs from building "
                             "the same unit. Upgrade the store, or set LEVER_LEASES=off to run without "
                             "coordination (then never run two plans on this store at once)")
        self._checked = True

    def _get(self, name: str, key: str) -> Optional[LeaseRecord]:
        def get() -> Optional[LeaseRecord]:
            try:
                resp = self.store.client.get_object(Bucket=self.store.bucket, Key=name)
            except Exception as exc:
                if is_not_found(exc):
                    return None
                raise
            raw = resp["Body"].read()
            return LeaseRecord.from_bytes(key, raw, resp.get("ETag"), fallback_time=resp["LastModified"].timestamp(),
                                          fallback_ttl=self.settings.ttl_s)

        return self._retried(f"reading lease {name}", get)

    def _ours(self, rec: LeaseRecord, seq: int) -> bool:
        """After a conflict: did our own (retried) write land?  Then adopt its ETag."""
        cur = self.read(rec.key)
        if cur is not None and cur.token == rec.token and cur.seq == seq:
            rec.version = cur.version
            return True
        return False

    # -- LeaseBackend -----------------------------------------------------------------------
    def try_acquire(self, rec: LeaseRecord) -> tuple[bool, Optional[LeaseRecord]]:
        self._check_support()
        name, body = self._name(rec.key), rec.to_bytes()
        status, etag = self._retried(f"creating lease {name}",
                                     lambda: self._write(self.store.client, name, body, create=True))
        if status == _WRITTEN:
            rec.version = etag
            return True, None
        cur = self.read(rec.key)
        if cur is not None and cur.token == rec.token:
            rec.version = cur.version
            return True, None
        return False, cur

    def take_over(self, rec: LeaseRecord, stale: LeaseRecord) -> bool:
        name, body = self._name(rec.key), rec.to_bytes()
        status, etag = self._retried(f"taking over lease {name}",
                                     lambda: self._write(self.store.client, name, body, if_match=stale.version))
        if status == _WRITTEN:
            rec.version = etag
            return True
        return self._ours(rec, rec.seq)

    def renew(self, rec: LeaseRecord) -> bool:
        fresh = rec.renewed_copy()
        status, etag = self._write(self._beat(), self._name(rec.key), fresh.to_bytes(), if_match=rec.version)
        if status == _WRITTEN:
            rec.renewed, rec.seq, rec.version = fresh.renewed, fresh.seq, etag
            return True
        if status == _CONFLICT and self._ours(rec, fresh.seq):
            rec.renewed, rec.seq = fresh.renewed, fresh.seq
            return True
        return False

    def release(self, rec: LeaseRecord) -> None:
        name = self._name(rec.key)

        def delete(version: Optional[str]) -> str:
            try:
                self.store.client.delete_object(Bucket=self.store.bucket, Key=name, IfMatch=version)
            except Exception as exc:
                if conflict(exc):
                    return _CONFLICT
                if is_not_found(exc):
                    return _MISSING
                raise
            return _WRITTEN

        if self._retried(f"releasing lease {name}", lambda: delete(rec.version)) == _CONFLICT:
            cur = self.read(rec.key)  # a renewal whose answer we never saw: still ours, by token
            if cur is not None and cur.token == rec.token:
                self._retried(f"releasing lease {name}", lambda: delete(cur.version))

    def read(self, key: str) -> Optional[LeaseRecord]:
        return self._get(self._name(key), key)

    def list(self) -> list[tuple[LeaseRecord, bool]]:
        out = []
        now = time.time()
        for name in sorted(self.store._list(self._base)):
            rel = name[len(self._base):]
            if not rel.endswith(".json") or rel.startswith("."):
                continue
            rec = self._get(name, rel[: -len(".json")])
            if rec is not None:
                out.append((rec, now - rec.renewed < rec.ttl_s))
        return out

    def remove_stale(self, rec: LeaseRecord) -> bool:
        name = self._name(rec.key)

        def delete() -> bool:
            try:
                self.store.client.delete_object(Bucket=self.store.bucket, Key=name, IfMatch=rec.version)
            except Exception as exc:
                if conflict(exc) or is_not_found(exc):
                    return False
                raise
            return True

        return self._retried(f"removing stale lease {name}", delete)
