"""Unit leases: one builder per unit at a time, across processes, pods, plans and retries.

Why: the store is content-addressed and shared, so two plans submitted together, a nightly run
beside a person's run, or an Argo retry of a pod still alive on a lost node all reach the same
units.  Without coordination each computes them (GPU-hours lost) and writes the same staging and
manifest.  A runner therefore builds a unit only while it holds the unit's lease; any other runner
of that unit waits, re-checking the committed manifest first, and then uses the result -- or
takes the lease over when its holder stopped renewing it.

Two backends, one protocol (:class:`LeaseBackend`):

* :class:`FileLeases` (local store): an OS ``flock`` on ``.leases/{key}.lock`` beside an info file
  naming the holder.  The kernel releases the lock when its holder dies, so a killed holder's
  unit is free at once; the heartbeat only refreshes the info ``lever store locks`` shows.
* ``S3Leases`` (``lever.storage.s3_leases``): an object ``.leases/{key}.json`` created with
  ``If-None-Match: *``, renewed by the holder's heartbeat with ``If-Match: <its ETag>`` and
  released with a conditional delete.  Every transition is a compare-and-swap on the ETag, so
  two runners can never both believe they took the same lease.  A holder that stops renewing
  (killed, partitioned, node lost) is taken over after its ``ttl_s``.

Expiry is judged without trusting clocks: a waiter takes a lease over when it has seen the same
lease version unchanged for the holder's ``ttl_s`` on its own monotonic clock.  A lease whose
last heartbeat, by the holder's wall clock, is more than twice its ttl old is taken over at once
(an abandoned lease found by a newcomer; safe while clocks agree within one ttl).  A holder that
could not renew for ``ttl_s`` (less one heartbeat) stops trusting its lease: before committing it
renews synchronously, which succeeds only if nobody took the lease over meanwhile.

Settings come from the environment (a store-level property, like the S3 retry settings: plans
sharing a store must not need to agree on them, and each lease records its own ttl):
``LEVER_LEASE_TTL_S`` (default 60), ``LEVER_LEASE_HEARTBEAT_S`` (default ttl/4),
``LEVER_LEASE_POLL_S`` (default 2), ``LEVER_LEASES=off`` (no coordination; for S3 endpoints
without conditional writes).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from lever.errors import StageError

log = logging.getLogger("lever.lease")

ENV_TTL = "LEVER_LEASE_TTL_S"
ENV_HEARTBEAT = "LEVER_LEASE_HEARTBEAT_S"
ENV_POLL = "LEVER_LEASE_POLL_S"
ENV_MODE = "LEVER_LEASES"
#: how often a waiter repeats "still waiting for ..." when nothing changed
_REPEAT_WAIT_MESSAGE_S = 30.0


class LeaseError(StageError):
    """Lease settings or the backend cannot work (bad environment value, an endpoint without
    conditional writes): the user's to fix, so exit 2 and no Argo retry."""


class LeaseLost(Exception):
    """This process no longer holds the lease of a unit: another runner took it over."""


@dataclass(frozen=True)
class LeaseSettings:
    ttl_s: float = 60.0
    heartbeat_s: float = 15.0
    poll_s: float = 2.0
    enabled: bool = True

    @classmethod
    def from_env(cls) -> "LeaseSettings":
        def number(name: str, default: float) -> float:
            raw = os.environ.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise LeaseError(f"{name}={raw!r}: expected a number of seconds") from None
            if not value > 0:
                raise LeaseError(f"{name}={raw!r}: must be > 0")
            return value

        mode = os.environ.get(ENV_MODE, "on").strip().lower() or "on"
        if mode not in ("on", "off"):
            raise LeaseError(f"{ENV_MODE}={mode!r}: expected on or off")
        ttl = number(ENV_TTL, cls.ttl_s)
        heartbeat = number(ENV_HEARTBEAT, ttl / 4)
        if heartbeat > ttl / 2:
            raise LeaseError(f"{ENV_HEARTBEAT}={heartbeat:g} must be at most half of {ENV_TTL}={ttl:g}: "
                             "a lease must survive one missed heartbeat")
        return cls(ttl_s=ttl, heartbeat_s=heartbeat, poll_s=number(ENV_POLL, cls.poll_s), enabled=mode == "on")


def owner_info(plan: str = "", run_id: str = "") -> dict:
    """Who holds a lease, for humans: run and plan, host and pid, and on Kubernetes the pod and
    (when Argo or the workflow sets it) the workflow."""
    out: dict = {"plan": plan, "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid()}
    pod = os.environ.get("LEVER_POD_NAME") or (os.environ.get("HOSTNAME") if os.environ.get("KUBERNETES_SERVICE_HOST") else None)
    if pod:
        out["pod"] = pod
    workflow = os.environ.get("ARGO_WORKFLOW_NAME") or os.environ.get("LEVER_WORKFLOW_NAME")
    if workflow:
        out["workflow"] = workflow
    return out


def _clock(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


@dataclass
class LeaseRecord:
    """The content of a lease (JSON in the lease object / info file).  Times are the holder's
    wall clock (epoch seconds): shown to humans, and used for takeover only past 2 x ttl."""

    key: str
    token: str
    owner: dict
    acquired: float
    renewed: float
    ttl_s: float
    seq: int = 0
    #: the backend's version of what was read or written (S3: the ETag); not serialized
    version: Optional[str] = field(default=None, compare=False)

    @classmethod
    def new(cls, key: str, owner: dict, ttl_s: float) -> "LeaseRecord":
        now = time.time()
        return cls(key=key, token=uuid.uuid4().hex, owner=dict(owner), acquired=now, renewed=now, ttl_s=ttl_s)

    @property
    def expires(self) -> float:
        return self.renewed + self.ttl_s

    def renewed_copy(self) -> "LeaseRecord":
        return dataclasses.replace(self, renewed=time.time(), seq=self.seq + 1, version=self.version)

    def to_bytes(self) -> bytes:
        body = {"schema_version": 1, "key": self.key, "token": self.token, "owner": self.owner,
                "acquired": self.acquired, "acquired_utc": _clock(self.acquired), "renewed": self.renewed,
                "renewed_utc": _clock(self.renewed), "ttl_s": self.ttl_s, "seq": self.seq}
        return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, key: str, raw: bytes, version: Optional[str], *, fallback_time: float,
                   fallback_ttl: float) -> "LeaseRecord":
        """Parse a lease; a damaged one still counts as held (by an unknown owner, last renewed at
        ``fallback_time``) so it expires like any other instead of being ignored or fatal."""
        try:
            d = json.loads(raw)
            return cls(key=key, token=str(d["token"]), owner=dict(d.get("owner") or {}), acquired=float(d["acquired"]),
                       renewed=float(d["renewed"]), ttl_s=float(d["ttl_s"]), seq=int(d.get("seq", 0)), version=version)
        except (ValueError, KeyError, TypeError) as exc:
            return cls(key=key, token="", owner={"unreadable": f"lease content unreadable ({exc})"},
                       acquired=fallback_time, renewed=fallback_time, ttl_s=fallback_ttl, version=version)

    def who(self) -> str:
        o = self.owner
        if "unreadable" in o:
            return o["unreadable"]
        parts = []
        if o.get("run_id"):
            parts.append(f"run {o['run_id']}")
        if o.get("plan"):
            parts.append(f"plan {o['plan']}")
        if o.get("workflow"):
            parts.append(f"workflow {o['workflow']}")
        if o.get("pod"):
            parts.append(f"pod {o['pod']}")
        parts.append(f"{o.get('host', '?')}:{o.get('pid', '?')}")
        return ", ".join(parts)

    def describe(self, now: Optional[float] = None) -> str:
        now = time.time() if now is None else now
        return (f"{self.who()}; holds it since {_clock(self.acquired)} ({_ago(now - self.acquired)} ago), "
                f"last heartbeat {_ago(now - self.renewed)} ago")


class LeaseBackend(ABC):
    """Atomic lease operations of one store.  ``try_acquire``/``take_over``/``renew`` are
    compare-and-swap operations: each succeeds for at most one runner."""

    #: True when the lease disappears by itself when its holder dies (OS locks): no expiry needed
    dies_with_holder: bool = False

    @abstractmethod
    def try_acquire(self, rec: LeaseRecord) -> tuple[bool, Optional[LeaseRecord]]:
        """Take a free lease: ``(True, None)`` (``rec.version`` set) or ``(False, current holder or
        None when it could not be read)``."""

    @abstractmethod
    def take_over(self, rec: LeaseRecord, stale: LeaseRecord) -> bool:
        """Replace the expired lease ``stale`` (exactly that version) by ``rec``."""

    @abstractmethod
    def renew(self, rec: LeaseRecord) -> bool:
        """Heartbeat: True when still ours (``rec`` updated), False when taken over or gone.
        Raises on a transient failure (the lease may still be ours)."""

    @abstractmethod
    def release(self, rec: LeaseRecord) -> None:
        """Give the lease up if it is still ours (never removes another runner's lease)."""

    @abstractmethod
    def read(self, key: str) -> Optional[LeaseRecord]:
        """The current lease of ``key`` (None when free)."""

    @abstractmethod
    def list(self) -> list[tuple[LeaseRecord, bool]]:
        """Every lease present, with whether its holder is alive (local) or its heartbeat recent
        (S3: renewed within its ttl)."""

    @abstractmethod
    def remove_stale(self, rec: LeaseRecord) -> bool:
        """Remove a lease left by a dead holder (``lever store gc``), only if still that version."""


class NoLeases(LeaseBackend):
    """``LEVER_LEASES=off``: every runner may build every unit (the behaviour before leases)."""

    dies_with_holder = True

    def try_acquire(self, rec: LeaseRecord) -> tuple[bool, Optional[LeaseRecord]]:
        return True, None

    def take_over(self, rec: LeaseRecord, stale: LeaseRecord) -> bool:
        return True

    def renew(self, rec: LeaseRecord) -> bool:
        return True

    def release(self, rec: LeaseRecord) -> None:
        pass

    def read(self, key: str) -> Optional[LeaseRecord]:
        return None

    def list(self) -> list[tuple[LeaseRecord, bool]]:
        return []

    def remove_stale(self, rec: LeaseRecord) -> bool:
        return False


def _remove_then_close(fd: int, *paths: Path) -> None:
    """Remove a lease's files while still holding its lock (nobody else can be using them), then
    release the lock by closing ``fd``."""
    try:
        for p in paths:
            p.unlink(missing_ok=True)
    finally:
        os.close(fd)


class FileLeases(LeaseBackend):
    """Leases of a local store: ``flock`` on ``{root}/.leases/{key}.lock`` plus ``{key}.json``
    naming the holder.  Release unlinks the lock file while still holding it; an acquirer checks
    that the file it locked is still the one at the path (else it locked an unlinked inode and
    tries again), so removing lock files never lets two processes in."""

    dies_with_holder = True

    def __init__(self, root: Path):
        self.dir = Path(root) / ".leases"
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _paths(self, key: str) -> tuple[Path, Path]:
        base = self.dir / key
        return base.with_name(base.name + ".lock"), base.with_name(base.name + ".json")

    def _write_info(self, rec: LeaseRecord) -> None:
        from lever.io import atomic_write_bytes

        atomic_write_bytes(self._paths(rec.key)[1], rec.to_bytes())

    def _lock_fd(self, lock: Path) -> Optional[int]:
        """An fd holding the exclusive lock on the file now at ``lock``, or None when busy."""
        while True:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # we locked a file a releasing holder had just unlinked: try the new one

    def try_acquire(self, rec: LeaseRecord) -> tuple[bool, Optional[LeaseRecord]]:
        fd = self._lock_fd(self._paths(rec.key)[0])
        if fd is None:
            return False, self.read(rec.key)
        with self._lock:
            self._fds[rec.token] = fd
        self._write_info(rec)
        return True, None

    def take_over(self, rec: LeaseRecord, stale: LeaseRecord) -> bool:
        return False  # a lock whose holder died is free: try_acquire gets it

    def renew(self, rec: LeaseRecord) -> bool:
        with self._lock:
            held = rec.token in self._fds
        if not held:
            return False
        fresh = rec.renewed_copy()
        self._write_info(fresh)
        rec.renewed, rec.seq = fresh.renewed, fresh.seq
        return True

    def release(self, rec: LeaseRecord) -> None:
        with self._lock:
            fd = self._fds.pop(rec.token, None)
        if fd is None:
            return
        lock, info = self._paths(rec.key)
        _remove_then_close(fd, info, lock)

    def read(self, key: str) -> Optional[LeaseRecord]:
        info = self._paths(key)[1]
        try:
            raw = info.read_bytes()
            mtime = info.stat().st_mtime
        except FileNotFoundError:
            return None
        return LeaseRecord.from_bytes(key, raw, None, fallback_time=mtime, fallback_ttl=0.0)

    def _alive(self, lock: Path) -> bool:
        fd = self._lock_fd(lock)
        if fd is None:
            return True
        os.close(fd)  # closing drops the probe's lock; the file stays for its next user
        return False

    def list(self) -> list[tuple[LeaseRecord, bool]]:
        out = []
        if not self.dir.is_dir():
            return out
        for lock in sorted(self.dir.rglob("*.lock")):
            key = lock.relative_to(self.dir).as_posix()[: -len(".lock")]
            rec = self.read(key)
            if rec is None:
                mtime = lock.stat().st_mtime if lock.exists() else time.time()
                rec = LeaseRecord(key=key, token="", owner={"unreadable": "holder not recorded yet"},
                                  acquired=mtime, renewed=mtime, ttl_s=0.0)
            out.append((rec, self._alive(lock)))
        return out

    def remove_stale(self, rec: LeaseRecord) -> bool:
        lock, info = self._paths(rec.key)
        fd = self._lock_fd(lock)
        if fd is None:
            return False  # its holder is alive
        _remove_then_close(fd, info, lock)
        return True


class HeldLease:
    """A lease this process holds.  A daemon thread renews it every ``heartbeat_s``; the runner
    calls :meth:`ensure` before anything only the holder may do (snapshot, commit)."""

    def __init__(self, backend: LeaseBackend, rec: LeaseRecord, settings: LeaseSettings):
        self.backend, self.record, self.settings = backend, rec, settings
        self.key = rec.key
        self._last_ok = time.monotonic()
        self._lost: Optional[str] = None
        self._mu = threading.Lock()  # one renewal at a time (heartbeat thread vs ensure)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{rec.key}", daemon=True)
        self._thread.start()

    def _renew(self) -> bool:
        with self._mu:
            if self._lost:
                return False
            ok = self.backend.renew(self.record)
            if ok:
                self._last_ok = time.monotonic()
            else:
                current = self.backend.read(self.key)
                self._lost = "taken over by " + (current.who() if current is not None and current.token else "another runner")
                log.error("lease of %s lost: %s", self.key, self._lost)
            return ok

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                if not self._renew():
                    return
            except Exception as exc:  # transient: the next beat retries; ensure() judges the age
                log.warning("lease heartbeat of %s failed: %s", self.key, exc)

    def _fresh(self) -> bool:
        if self.backend.dies_with_holder:
            return True
        margin = min(self.settings.heartbeat_s, self.record.ttl_s / 4)
        return time.monotonic() - self._last_ok < self.record.ttl_s - margin

    @property
    def lost(self) -> Optional[str]:
        return self._lost

    def valid(self) -> bool:
        """Cheap check: still ours as far as this process knows (no network call)."""
        return self._lost is None and self._fresh()

    def ensure(self, what: str) -> None:
        """Raise :class:`LeaseLost` unless the lease is still ours.  When the heartbeat could not
        reach the store for too long, renew now: success proves nobody took the lease over."""
        if self._lost is None and not self._fresh():
            try:
                self._renew()
            except Exception as exc:
                raise LeaseLost(f"lease of {self.key} could not be renewed before {what} ({exc}); "
                                f"another runner may hold it now") from None
        if self._lost is not None:
            raise LeaseLost(f"lease of {self.key} lost before {what}: {self._lost}")

    def close(self) -> None:
        """Stop the heartbeat and release the lease (a no-op on one taken over)."""
        self._stop.set()
        self._thread.join(timeout=max(5.0, self.settings.heartbeat_s * 2))
        try:
            self.backend.release(self.record)
        except Exception as exc:  # an unreleased lease only costs the next runner one ttl
            log.warning("could not release the lease of %s: %s", self.key, exc)

    def __enter__(self) -> "HeldLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Waiting:
    """What a runner waiting for a unit saw (for its progress line and the unit's result)."""

    key: str
    holder: Optional[LeaseRecord] = None
    since: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.since


class UnitBusy(Exception):
    """``wait=False`` and another live runner holds the unit."""

    def __init__(self, key: str, holder: Optional[LeaseRecord]):
        super().__init__(f"{key} is being built by " + (holder.who() if holder else "another runner"))
        self.key, self.holder = key, holder


def _expired(holder: LeaseRecord, first_seen: dict[Optional[str], float]) -> bool:
    """A waiter's verdict: unchanged for the holder's ttl on our monotonic clock, or abandoned
    (last heartbeat older than 2 x ttl by the wall clock)."""
    seen = first_seen.setdefault(holder.version, time.monotonic())
    if holder.ttl_s <= 0:
        return False
    return time.monotonic() - seen >= holder.ttl_s or time.time() - holder.renewed > 2 * holder.ttl_s


def acquire_unit(backend: LeaseBackend, key: str, owner: dict, settings: LeaseSettings, *,
                 done: Callable[[], bool], wait: bool = True, say: Callable[[str], None] = log.info,
                 waiting: Optional[Waiting] = None) -> Optional[HeldLease]:
    """The lease of ``key`` for building it, or None when it is (or becomes) committed.

    Order matters: the committed manifest is checked first on every round after the first (the
    caller has just checked it; a waiter uses the finished result instead of taking a lease it
    does not need), and once more right after acquiring (the previous holder may have committed
    and released in between).  With
    ``wait=False`` a unit held by a live runner raises :class:`UnitBusy` (so a runner can do other
    units first); an expired one is taken over either way."""
    waiting = waiting or Waiting(key)
    first_seen: dict[Optional[str], float] = {}
    last_said, last_who = 0.0, None
    first = True
    while True:
        if not first and done():
            return None
        rec = LeaseRecord.new(key, owner, settings.ttl_s)
        holder = None
        if not first and not backend.dies_with_holder:
            # watching a held lease costs one read per round; a write is tried only when it is free
            holder = backend.read(key)
        first = False
        if holder is not None and not _expired(holder, first_seen):
            got = False
        else:
            got, holder = backend.try_acquire(rec)
        if not got and holder is not None and not backend.dies_with_holder and _expired(holder, first_seen):
            say(f"taking over {key} from {holder.who()} (no heartbeat for "
                f"{_ago(time.time() - holder.renewed)} by its clock, ttl {holder.ttl_s:g}s)")
            got = backend.take_over(rec, holder)
        if got:
            if done():  # always called right after acquiring: the caller relies on it
                backend.release(rec)
                return None
            return HeldLease(backend, rec, settings)
        waiting.holder = holder
        if not wait:
            raise UnitBusy(key, holder)
        who = holder.who() if holder is not None else None
        now = time.monotonic()
        if who != last_who or now - last_said >= _REPEAT_WAIT_MESSAGE_S:
            what = holder.describe() if holder is not None else "another runner (holder not recorded yet)"
            say(f"waiting for {key} ({_ago(waiting.seconds)} so far): held by {what}")
            last_said, last_who = now, who
        time.sleep(settings.poll_s)


def iter_live(backend: LeaseBackend) -> Iterator[tuple[LeaseRecord, bool]]:
    """Leases for ``lever store locks``, oldest first."""
    yield from sorted(backend.list(), key=lambda x: x[0].acquired)
