"""Artifact store: one interface, a local-directory backend here and S3 in ``s3.py``.

Layout (relative keys, the same in both backends)::

    {stage}/{unit_hash}/...files...        a committed artifact
    {stage}/{unit_hash}/_manifest.json      its manifest; present <=> committed
    partial/{plan}/{run_id}/...             partial reports (never used as a cache)
    runs/{plan}/{run_id}.json               what a run did (human index, not read back as data)
    plans/{plan}/latest.json                the latest run of a plan (keys of its report etc.)
    .staging/{key}/...                      a unit being built (S3: its last snapshot)
    .quarantine/{name}/...                  artifacts that failed verification, kept for inspection
    .leases/{key}.*                         who builds a unit now (``lease.py``)

Why a manifest per artifact: it is the commit marker (an artifact without one is invisible), and
its sha256 list is how a damaged or half-copied artifact is detected instead of silently used.
Stages never write to a final key: they write into a *staging* directory that survives a kill (so a
stage can resume from what it finds there) and the store commits it atomically (local: one
``rename``; S3: every file first, the manifest last).  Only the holder of a unit's lease
(``lease.py``) builds, resumes or commits it, so concurrent runs never build a unit twice.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from lever.io import atomic_write_json as _atomic_write_json

MANIFEST = "_manifest.json"
MANIFEST_SCHEMA = 1
_KEY_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


class StoreError(Exception):
    """The store itself failed (unreachable bucket, permissions): not the user's plan's fault."""


class CorruptArtifact(Exception):
    """A committed artifact whose files do not match its manifest."""

    def __init__(self, key: str, problems: list[str]):
        super().__init__(f"artifact {key} is corrupt: " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
        self.key = key
        self.problems = problems


class StagingBusy(Exception):
    """Another live process holds the staging directory of this unit."""


def check_key(key: str) -> str:
    parts = key.split("/")
    if not parts or any(not _KEY_PART.match(p) for p in parts):
        raise ValueError(f"invalid store key {key!r}")
    return key


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root`` (relative paths, sorted), the manifest excluded."""
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            rel = p.relative_to(root)
            if rel.as_posix() != MANIFEST:
                yield rel


def atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_json(path, obj, indent=2, sort_keys=True)


@lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """Commit of the source tree this lever runs from, if it is a git checkout (read-only query)."""
    env = os.environ.get("LEVER_GIT_COMMIT")
    if env:
        return env
    src = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_manifest(staging: Path, key: str, meta: dict) -> dict:
    """Describe every file in ``staging`` (sha256 + size) plus provenance."""
    from lever import __version__

    files = {}
    for rel in iter_files(staging):
        p = staging / rel
        files[rel.as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return {
        "schema_version": MANIFEST_SCHEMA,
        "key": key,
        "lever_version": __version__,
        "git_commit": git_commit(),
        "created": utc_now(),
        **meta,
        "files": files,
    }


def verify_dir(root: Path, manifest: dict) -> list[str]:
    """Problems of a local copy against its manifest ([] = intact).  Extra files count as problems:
    a stage reading a directory (e.g. globbing shards) would otherwise see foreign data."""
    problems = []
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        return ["manifest has no 'files' table"]
    for rel, info in listed.items():
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = p.stat().st_size
        if size != info.get("size"):
            problems.append(f"{rel}: size {size} != manifest {info.get('size')}")
            continue
        if sha256_file(p) != info.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch")
    for rel in iter_files(root):
        if rel.as_posix() not in listed:
            problems.append(f"{rel.as_posix()}: not in manifest")
    return problems


@dataclass
class Staging:
    """A unit's persistent staging directory, locked for the duration of a build."""

    key: str
    path: Path
    lock_path: Path
    _fd: Optional[int] = None

    def __enter__(self) -> "Staging":
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StagingBusy(f"{self.key} is being built by another process (lock {self.lock_path})") from None
        self._fd = fd
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def key_depth(first_part: str) -> int:
    """How many path parts make a key: ``stage/hash``, but ``partial/plan/run_id``."""
    return 3 if first_part == "partial" else 2


@dataclass
class Leftover:
    """Something ``lever store gc`` may remove: a staging dir, a quarantined artifact, a lease."""

    kind: str  # staging | quarantine | lease
    name: str  # the unit key (staging, lease) or the quarantine entry's name
    newest: float  # epoch seconds of its newest file / last heartbeat
    size: int
    location: str


GuardFn = Optional[Callable[[str], None]]


class Store(ABC):
    """What the runner needs from a backend.  Keys are relative paths (``stage/hash``)."""

    url: str
    _leases: Any = None
    #: True when committed artifacts live away from this machine and are cached locally (the CLI
    #: then also prints where the local copy is; the runner snapshots staging for other nodes)
    is_remote: bool = False

    @abstractmethod
    def manifest(self, key: str) -> Optional[dict]:
        """The committed manifest, or None when the artifact is not committed."""

    @abstractmethod
    def check(self, key: str) -> Optional[list[str]]:
        """Cache check: None = not committed, [] = committed and intact, [...] = corrupt."""

    @abstractmethod
    def open(self, key: str) -> Path:
        """A local directory holding the verified artifact (raises CorruptArtifact / KeyError)."""

    @abstractmethod
    def staging(self, key: str) -> Staging:
        """The persistent, locked staging directory of ``key`` (use as a context manager)."""

    @abstractmethod
    def commit(self, key: str, meta: dict, guard: GuardFn = None) -> dict:
        """Atomically publish the staging directory of ``key``; returns the manifest (another
        runner's, when it committed the same key first).  ``guard(what)`` is called before each
        step that publishes bytes and raises to stop (the caller's lease is gone)."""

    @abstractmethod
    def quarantine(self, key: str, reason: str) -> str:
        """Move a corrupt artifact out of the way (kept for inspection); returns where it went."""

    @abstractmethod
    def discard_staging(self, key: str) -> None:
        """Drop a unit's staging directory (``--fresh``)."""

    @abstractmethod
    def put_json(self, key: str, obj: Any) -> None:
        """Write a small non-artifact JSON document (run records), atomically."""

    @abstractmethod
    def get_json(self, key: str) -> Optional[Any]:
        """Read one written by :meth:`put_json`; None when absent."""

    @abstractmethod
    def location(self, key: str, rel: str = "") -> str:
        """Human-readable location (path or URL) of a key or a file inside it."""

    @abstractmethod
    def local_path(self, key: str, rel: str = "") -> Path:
        """Where a committed artifact (or a file inside it) is on this machine: the artifact
        itself for a local store, the verified cached copy for a remote one."""

    def sync_staging(self, key: str) -> int:
        """Copy the staging files of ``key`` to where a worker on another machine can resume from;
        returns the number of files copied.  A store whose staging is already where every worker
        sees it has nothing to copy."""
        return 0

    def spec(self) -> dict:
        """How a worker process reopens this store (see ``lever.storage.backends.open_store``)."""
        return {"url": self.url}

    def leases(self) -> Any:
        """The :class:`lever.storage.lease.LeaseBackend` of this store (``LEVER_LEASES=off``: none)."""
        if self._leases is None:
            from lever.storage.lease import LeaseSettings, NoLeases

            self._leases = self._lease_backend() if LeaseSettings.from_env().enabled else NoLeases()
        return self._leases

    @abstractmethod
    def _lease_backend(self) -> Any:
        """This backend's lease implementation."""

    @abstractmethod
    def leftovers(self) -> list[Leftover]:
        """Staging directories and quarantined artifacts present (for ``lever store gc``)."""

    @abstractmethod
    def remove_leftover(self, item: Leftover) -> None:
        """Delete one staging directory or quarantined artifact."""


class LocalStore(Store):
    """A directory tree.  Commit = ``rename(staging, final)`` on the same filesystem."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)
        # (key -> fingerprint of the files when last verified): re-verifying an unchanged artifact
        # in the same process (cache check, then as a downstream input) is wasted hashing
        self._verified: dict[str, tuple] = {}

    def _dir(self, key: str) -> Path:
        return self.root / check_key(key)

    def _fingerprint(self, d: Path) -> tuple:
        out = []
        for rel in iter_files(d):
            st = (d / rel).stat()
            out.append((rel.as_posix(), st.st_size, st.st_mtime_ns))
        mf = d / MANIFEST
        out.append((MANIFEST, mf.stat().st_mtime_ns if mf.exists() else 0))
        return tuple(out)

    def manifest(self, key: str) -> Optional[dict]:
        p = self._dir(key) / MANIFEST
        if not p.is_file():
            return None
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            return {"_unreadable": str(exc)}
        return data if isinstance(data, dict) else {"_unreadable": "not a JSON object"}

    def check(self, key: str) -> Optional[list[str]]:
        m = self.manifest(key)
        if m is None:
            return None
        if "_unreadable" in m:
            return [f"{MANIFEST}: unreadable ({m['_unreadable']})"]
        d = self._dir(key)
        fp = self._fingerprint(d)
        if self._verified.get(key) == fp:
            return []
        problems = verify_dir(d, m)
        if not problems:
            self._verified[key] = fp
        return problems

    def open(self, key: str) -> Path:
        problems = self.check(key)
        if problems is None:
            raise KeyError(key)
        if problems:
            raise CorruptArtifact(key, problems)
        return self._dir(key)

    def staging(self, key: str) -> Staging:
        check_key(key)
        return Staging(key, self.root / ".staging" / key, self.root / ".locks" / (key.replace("/", "__") + ".lock"))

    def commit(self, key: str, meta: dict, guard: GuardFn = None) -> dict:
        staging = self.root / ".staging" / check_key(key)
        manifest = build_manifest(staging, key, meta)
        atomic_write_json(staging / MANIFEST, manifest)
        final = self._dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if guard is not None:
            guard("commit")
        if final.exists():
            # a concurrent builder won the race, or a corrupt copy was not quarantined
            if self.check(key) == []:
                shutil.rmtree(staging)
                return self.manifest(key) or manifest
            self.quarantine(key, "replaced by a fresh build")
        _fsync_dir(staging)
        os.rename(staging, final)
        _fsync_dir(final.parent)
        self._verified.pop(key, None)
        return manifest

    def quarantine(self, key: str, reason: str) -> str:
        src = self._dir(key)
        dest = self.root / ".quarantine" / f"{key.replace('/', '__')}-{int(time.time())}-{os.getpid()}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.exists():
            os.rename(src, dest)
            atomic_write_json(dest / "_quarantine.json", {"key": key, "reason": reason, "at": utc_now()})
        self._verified.pop(key, None)
        return str(dest)

    def discard_staging(self, key: str) -> None:
        shutil.rmtree(self.root / ".staging" / check_key(key), ignore_errors=True)

    def put_json(self, key: str, obj: Any) -> None:
        atomic_write_json(self._dir(key), obj)

    def get_json(self, key: str) -> Optional[Any]:
        p = self._dir(key)
        if not p.is_file():
            return None
        return json.loads(p.read_text())

    def location(self, key: str, rel: str = "") -> str:
        p = self._dir(key)
        return str(p / rel) if rel else str(p)

    def local_path(self, key: str, rel: str = "") -> Path:
        p = self._dir(key)
        return p / rel if rel else p

    def _lease_backend(self) -> Any:
        from lever.storage.lease import FileLeases

        return FileLeases(self.root)

    def leftovers(self) -> list[Leftover]:
        out = []
        staging = self.root / ".staging"
        if staging.is_dir():
            for first in sorted(p for p in staging.iterdir() if p.is_dir()):
                depth = key_depth(first.name)
                for d in sorted(first.glob("/".join(["*"] * (depth - 1)))):
                    if d.is_dir():
                        out.append(_dir_leftover("staging", d.relative_to(staging).as_posix(), d))
        quarantine = self.root / ".quarantine"
        if quarantine.is_dir():
            for d in sorted(p for p in quarantine.iterdir() if p.is_dir()):
                out.append(_dir_leftover("quarantine", d.name, d))
        return out

    def remove_leftover(self, item: Leftover) -> None:
        area = {"staging": ".staging", "quarantine": ".quarantine"}[item.kind]
        target = self.root / area / item.name
        if item.kind == "staging":
            check_key(item.name)
            # the unit's staging lock: a process building it right now (without a lease, e.g. an
            # older lever) keeps its directory
            with Staging(item.name, target, self.root / ".locks" / (item.name.replace("/", "__") + ".lock")):
                shutil.rmtree(target, ignore_errors=True)
        else:
            shutil.rmtree(target, ignore_errors=True)


def _dir_leftover(kind: str, name: str, d: Path) -> Leftover:
    newest, size = d.stat().st_mtime, 0
    for p in d.rglob("*"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        newest = max(newest, st.st_mtime)
        if p.is_file():
            size += st.st_size
    return Leftover(kind, name, newest, size, str(d))


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
