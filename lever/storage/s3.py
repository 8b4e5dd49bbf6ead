"""S3 backend of the artifact store (AWS, MinIO or any S3-compatible endpoint).

Why stages still see local directories: stage code stays backend-agnostic.  Inputs are
downloaded into a local cache and verified against their manifest's sha256 before a stage sees
them; outputs are built in a local staging directory and uploaded on commit, every file first and
the manifest last, so an artifact is visible (committed) only once all its bytes are there.

Configuration comes from the environment only: ``LEVER_S3_ENDPOINT`` or ``AWS_ENDPOINT_URL``
(unset = AWS), ``AWS_REGION``/``AWS_DEFAULT_REGION``, credentials from boto3's default chain
(env vars, shared config, IRSA / instance profile).  Nothing here logs or records them.
``LEVER_STORE_CACHE`` (else ``LEVER_CACHE_DIR``, else ``~/.cache/lever``) holds the local cache
and staging (``s3/{bucket}/{prefix}/`` below it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

from lever.storage.lease import LeaseError, LeaseSettings
from lever.storage.s3_client import (
    Retryable,
    conflict,
    is_not_found,
    make_client,
    max_attempts,
    retryable,
    unsupported,
)
from lever.storage.store import (
    MANIFEST,
    CorruptArtifact,
    GuardFn,
    Leftover,
    Staging,
    Store,
    StoreError,
    atomic_write_json,
    build_manifest,
    check_key,
    iter_files,
    key_depth,
    sha256_file,
    utc_now,
    verify_dir,
)

log = logging.getLogger("lever.s3")
_MB = 1024 * 1024
_DAMAGED_ATTEMPTS = 3
#: bucket areas beside the content-addressed keys (see store.py's layout)
INTERNAL_AREAS = (".staging", ".quarantine", ".leases")


def multipart_threshold() -> int:
    return max(5 * _MB, int(os.environ.get("LEVER_S3_MULTIPART_THRESHOLD", str(64 * _MB))))


class S3Store(Store):
    is_remote = True

    def __init__(self, bucket: str, prefix: str = "", cache_dir: Optional[str | Path] = None, client: Any = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        base = Path(cache_dir or os.environ.get("LEVER_STORE_CACHE") or os.environ.get("LEVER_CACHE_DIR")
                    or Path.home() / ".cache" / "lever")
        self.cache = base.expanduser().resolve() / "s3" / bucket / (self.prefix.replace("/", "__") or "_root")
        self.cache.mkdir(parents=True, exist_ok=True)
        self._client = client
        self._checked: dict[str, str] = {}
        # committed artifacts are immutable (content-addressed) until quarantined, so within one
        # process a manifest seen once, and a size check passed once, need no second round trip
        self._manifests: dict[str, dict] = {}
        self._intact: set[str] = set()

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client()
        return self._client

    def _obj(self, key: str, rel: str = "") -> str:
        """Object name of a key (or a file in it).  Internal areas (``.staging/``,
        ``.quarantine/``, ``.leases/``) are prefixed to an already-checked key."""
        area, sep, rest = key.partition("/")
        checked = f"{area}/{check_key(rest)}" if area in INTERNAL_AREAS and sep else check_key(key)
        parts = [p for p in (self.prefix, checked, rel) if p]
        return "/".join(parts)

    def _retry(self, what: str, fn: Callable[[], Any], *, not_found: Any = Retryable) -> Any:
        """Run one S3 operation with exponential backoff (plus jitter) on throttling, 5xx, dropped
        connections and damaged bodies; ``LEVER_S3_MAX_ATTEMPTS`` tries in all.  Anything else,
        or the last failure, becomes a StoreError naming the operation (never the credentials).
        ``not_found``: value to return on 404 instead of failing."""
        attempts = max_attempts()
        damaged = 0
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except LeaseError:
                raise
            except Exception as exc:
                if not_found is not Retryable and is_not_found(exc):
                    return not_found
                # bytes that arrive but do not match: a transfer fault is cured by one or two more
                # tries; an object damaged in the bucket is not, so do not spend the whole budget
                damaged += isinstance(exc, Retryable)
                if not retryable(exc) or attempt == attempts or damaged >= _DAMAGED_ATTEMPTS:
                    raise StoreError(f"{self.url}: {what} failed"
                                     + (f" after {attempt} attempts" if attempt > 1 else "") + f": {exc}") from None
                delay = min(5.0, 0.1 * (2 ** (attempt - 1))) * (0.5 + random.random())
                log.warning("%s: %s (attempt %d/%d), retrying in %.1fs", what, exc, attempt, attempts, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _get_bytes(self, name: str) -> Optional[bytes]:
        def get() -> bytes:
            resp = self.client.get_object(Bucket=self.bucket, Key=name)
            body = resp["Body"].read()
            _check_etag(body, resp.get("ETag"), name)
            return body

        return self._retry(f"reading {name}", get, not_found=None)

    def _list(self, name_prefix: str) -> dict[str, int]:
        """Object name -> size under a prefix."""
        return {name: size for name, (size, _) in self._list_meta(name_prefix).items()}

    def _list_meta(self, name_prefix: str) -> dict[str, tuple[int, float]]:
        """Object name -> (size, last-modified epoch seconds) under a prefix."""

        def listing() -> dict[str, tuple[int, float]]:
            out: dict[str, tuple[int, float]] = {}
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=name_prefix):
                for obj in page.get("Contents", []):
                    out[obj["Key"]] = (obj["Size"], obj["LastModified"].timestamp())
            return out

        return self._retry(f"listing {name_prefix}", listing)

    def _put_if_absent(self, name: str, body: bytes) -> bool:
        """Create ``name`` only if no object has that name (``If-None-Match: *``): True when this
        call (or its retried attempt) wrote it, False when another writer's object is there."""
        for _ in range(20):
            def put() -> str:
                try:
                    self.client.put_object(Bucket=self.bucket, Key=name, Body=body, ContentType="application/json",
                                           ContentMD5=base64.b64encode(hashlib.md5(body).digest()).decode(),
                                           IfNoneMatch="*")
                    return "written"
                except Exception as exc:
                    if conflict(exc):
                        return "conflict"
                    raise unsupported(exc, "If-None-Match") or exc

            if self._retry(f"writing {name}", put) == "written":
                return True
            existing = self._get_bytes(name)
            if existing is not None:
                return existing == body  # equal: our own attempt whose answer was lost
            time.sleep(0.05)  # 409: a concurrent conditional write was in flight; it may yet fail
        raise StoreError(f"{self.url}: writing {name} kept conflicting with concurrent writers")

    def _put(self, name: str, body: bytes, content_type: str = "application/json") -> None:
        self._retry(f"writing {name}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=name, Body=body, ContentType=content_type,
            ContentMD5=base64.b64encode(hashlib.md5(body).digest()).decode()))

    def _upload(self, path: Path, name: str) -> None:
        """Upload one file (multipart above ``LEVER_S3_MULTIPART_THRESHOLD``, default 64 MiB)."""
        from boto3.s3.transfer import TransferConfig

        t = multipart_threshold()
        cfg = TransferConfig(multipart_threshold=t, multipart_chunksize=t, use_threads=False)
        self._retry(f"uploading {name}", lambda: self.client.upload_file(str(path), self.bucket, name, Config=cfg))

    def _download(self, name: str, path: Path, size: Optional[int] = None, sha256: Optional[str] = None) -> None:
        """Download one object; with ``sha256`` given, a damaged copy counts as a failed attempt."""
        from boto3.s3.transfer import TransferConfig

        path.parent.mkdir(parents=True, exist_ok=True)
        t = multipart_threshold()
        cfg = TransferConfig(multipart_threshold=t, multipart_chunksize=t, use_threads=False)

        def get() -> None:
            self.client.download_file(self.bucket, name, str(path), Config=cfg)
            if size is not None and path.stat().st_size != size:
                raise Retryable(f"{name}: got {path.stat().st_size} bytes, manifest says {size}")
            if sha256 is not None and sha256_file(path) != sha256:
                raise Retryable(f"{name}: downloaded bytes do not match the manifest's sha256")

        self._retry(f"downloading {name}", get)

    def _delete_prefix(self, name_prefix: str) -> None:
        names = list(self._list(name_prefix))
        for i in range(0, len(names), 1000):
            chunk = names[i:i + 1000]
            self._retry(f"deleting under {name_prefix}", lambda: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": n} for n in chunk], "Quiet": True}))

    # -- Store interface --------------------------------------------------------------------
    def manifest(self, key: str) -> Optional[dict]:
        if key in self._manifests:
            return self._manifests[key]
        raw = self._get_bytes(self._obj(key, MANIFEST))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            return {"_unreadable": str(exc)}
        if not isinstance(data, dict):
            return {"_unreadable": "not a JSON object"}
        self._manifests[key] = data
        return data

    def _forget(self, key: str) -> None:
        self._manifests.pop(key, None)
        self._intact.discard(key)
        self._checked.pop(key, None)

    def check(self, key: str) -> Optional[list[str]]:
        """Committed = manifest present; intact = every listed object present with its size.
        Content hashes are checked on download (:meth:`open`), before any stage reads a byte."""
        m = self.manifest(key)
        if m is None:
            return None
        if "_unreadable" in m or not isinstance(m.get("files"), dict):
            return [f"{MANIFEST}: unreadable"]
        if key in self._intact:
            return []
        present = self._list(self._obj(key) + "/")
        problems = []
        for rel, info in m["files"].items():
            size = present.get(self._obj(key, rel))
            if size is None:
                problems.append(f"{rel}: missing")
            elif size != info.get("size"):
                problems.append(f"{rel}: size {size} != manifest {info.get('size')}")
        if not problems:
            self._intact.add(key)
        return problems

    def open(self, key: str) -> Path:
        m = self.manifest(key)
        if m is None:
            raise KeyError(key)
        if "_unreadable" in m or not isinstance(m.get("files"), dict):
            raise CorruptArtifact(key, [f"{MANIFEST}: unreadable"])
        local = self.cache / "objects" / key
        stamp = json.dumps(m, sort_keys=True)
        if self._checked.get(key) == stamp:
            return local
        if self._local_copy_ok(local, m):
            self._checked[key] = stamp
            return local
        incoming = self.cache / ".incoming" / f"{key.replace('/', '__')}-{os.getpid()}"
        shutil.rmtree(incoming, ignore_errors=True)
        try:
            for rel, info in m["files"].items():
                self._download(self._obj(key, rel), incoming / rel, info.get("size"), info.get("sha256"))
        except StoreError as exc:
            shutil.rmtree(incoming, ignore_errors=True)  # nothing half-downloaded stays in the cache
            if "do not match" in str(exc) or "manifest says" in str(exc):
                raise CorruptArtifact(key, [str(exc)]) from None
            raise
        atomic_write_json(incoming / MANIFEST, m)
        self._install(incoming, local, m)
        self._checked[key] = stamp
        return local

    def _local_copy_ok(self, local: Path, m: dict) -> bool:
        if not (local / MANIFEST).is_file():
            return False
        try:
            same = json.loads((local / MANIFEST).read_text()) == m
        except (OSError, ValueError):
            return False
        return same and not verify_dir(local, m)

    def _install(self, incoming: Path, local: Path, m: dict) -> None:
        """Move a verified download into the cache.  Worker processes sharing the cache may race
        to install the same artifact: a valid copy already in place wins and is never deleted
        under a reader; only a stale or damaged one is moved aside first."""
        local.parent.mkdir(parents=True, exist_ok=True)
        if local.exists() and not self._local_copy_ok(local, m):
            trash = local.with_name(f".{local.name}.old{os.getpid()}")
            try:
                os.rename(local, trash)
                shutil.rmtree(trash, ignore_errors=True)
            except OSError:
                pass
        try:
            os.rename(incoming, local)
        except OSError:
            shutil.rmtree(incoming, ignore_errors=True)
            if not self._local_copy_ok(local, m):
                raise StoreError(f"{self.url}: could not install {local} in the local cache") from None

    def staging(self, key: str) -> Staging:
        check_key(key)
        st = Staging(key, self.cache / ".staging" / key, self.cache / ".locks" / (key.replace("/", "__") + ".lock"))
        return _RestoringStaging(st, self)

    def sync_staging(self, key: str) -> int:
        """Upload the local staging files of ``key`` to ``.staging/`` in the bucket (a snapshot a
        pod on another node can resume from).  Returns the number of files uploaded."""
        local = self.cache / ".staging" / check_key(key)
        n = 0
        for rel in iter_files(local):
            self._upload(local / rel, self._obj(".staging/" + key, rel.as_posix()))
            n += 1
        return n

    def restore_staging(self, key: str) -> int:
        """Pull a staging snapshot into an empty local staging dir; returns files restored."""
        local = self.cache / ".staging" / check_key(key)
        if local.exists() and any(local.iterdir()):
            return 0
        base = self._obj(".staging/" + key) + "/"
        names = self._list(base)
        for name in names:
            self._download(name, local / name[len(base):])
        return len(names)

    def commit(self, key: str, meta: dict, guard: GuardFn = None) -> dict:
        """Upload every file, then create the manifest with ``If-None-Match: *``: at most one
        manifest is ever written per key, even by two runners whose leases overlapped (a holder
        cut off from S3 past its ttl).  The loser adopts the winner's artifact."""
        staging = self.cache / ".staging" / check_key(key)
        manifest = build_manifest(staging, key, meta)
        self._forget(key)
        if guard is not None:
            guard("commit")  # a lease holder: nobody else commits this key while the lease is ours
        elif self.manifest(key) is not None and self.check(key) == []:
            return self._adopt(key, staging, "before uploading")
        for rel in manifest["files"]:
            if guard is not None:
                guard(f"uploading {rel}")
            self._upload(staging / rel, self._obj(key, rel))
        if guard is not None:
            guard("writing the manifest")
        body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        self._forget(key)
        name = self._obj(key, MANIFEST)  # last: only now is the artifact committed
        if not LeaseSettings.from_env().enabled:
            self._put(name, body)  # LEVER_LEASES=off: endpoints without conditional writes
        elif not self._put_if_absent(name, body):
            return self._adopt(key, staging, "while this one uploaded")
        self._manifests[key] = manifest
        self._intact.add(key)
        atomic_write_json(staging / MANIFEST, manifest)
        local = self.cache / "objects" / key
        shutil.rmtree(local, ignore_errors=True)
        local.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, local)
        self._checked[key] = json.dumps(manifest, sort_keys=True)
        try:
            self._delete_prefix(self._obj(".staging/" + key) + "/")
        except Exception:  # a leftover snapshot is harmless
            pass
        return manifest

    def _adopt(self, key: str, staging: Path, when: str) -> dict:
        """Another runner committed ``key`` first: drop this build and use its artifact."""
        self._forget(key)
        theirs = self.manifest(key)
        if theirs is None:
            raise StoreError(f"{self.url}: {key}: the manifest write conflicted but no manifest is there")
        log.warning("%s was committed by another runner (run %s) %s; keeping that artifact, dropping this build",
                    key, theirs.get("run_id", "?"), when)
        shutil.rmtree(staging, ignore_errors=True)
        problems = self.check(key)
        if problems:  # our uploads overwrote some of its files with different bytes: say so loudly
            log.error("%s: the committed artifact no longer matches its manifest (%s); readers will "
                      "quarantine and rebuild it", key, "; ".join(problems[:3]))
        return theirs

    def quarantine(self, key: str, reason: str) -> str:
        dest = self._obj(".quarantine/" + key.replace("/", "__") + "-" + utc_now().replace(":", ""))
        raw = self._get_bytes(self._obj(key, MANIFEST))
        record = {"key": key, "reason": reason, "at": utc_now(),
                  "manifest": raw.decode(errors="replace") if raw else None}
        self._put(dest + "/_quarantine.json", json.dumps(record, indent=2).encode())
        # keep the bytes: "corrupt" may only mean the downloads were damaged in transit, and a
        # finished artifact must stay recoverable (server-side copies; multipart above 5 GB)
        base = self._obj(key) + "/"
        for name in self._list(base):
            self._retry(f"keeping {name}", lambda n=name: self.client.copy(
                {"Bucket": self.bucket, "Key": n}, self.bucket, f"{dest}/{n[len(base):]}"))
        # manifest first: the artifact stops being "committed" before its files go
        self._retry(f"uncommitting {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._obj(key, MANIFEST)))
        self._delete_prefix(self._obj(key) + "/")
        shutil.rmtree(self.cache / "objects" / key, ignore_errors=True)
        self._forget(key)
        return f"s3://{self.bucket}/{dest}"

    def discard_staging(self, key: str) -> None:
        shutil.rmtree(self.cache / ".staging" / check_key(key), ignore_errors=True)
        self._delete_prefix(self._obj(".staging/" + key) + "/")

    def put_json(self, key: str, obj: Any) -> None:
        self._put(self._obj(key), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def get_json(self, key: str) -> Optional[Any]:
        raw = self._get_bytes(self._obj(key))
        return None if raw is None else json.loads(raw)

    def location(self, key: str, rel: str = "") -> str:
        return f"s3://{self.bucket}/{self._obj(key, rel)}"

    def local_path(self, key: str, rel: str = "") -> Path:
        """Where the cached copy of a committed artifact lives on this machine."""
        p = self.cache / "objects" / key
        return p / rel if rel else p

    def spec(self) -> dict:
        return {"url": self.url, "cache_dir": str(self.cache.parents[2])}

    def _lease_backend(self) -> Any:
        from lever.storage.s3_leases import S3Leases

        return S3Leases(self)

    def leftovers(self) -> list[Leftover]:
        """Staging snapshots in the bucket (grouped by unit key) and quarantined artifacts."""
        out: list[Leftover] = []
        for kind, area in (("staging", ".staging"), ("quarantine", ".quarantine")):
            base = "/".join(p for p in (self.prefix, area) if p) + "/"
            groups: dict[str, list[tuple[int, float]]] = {}
            for name, meta in self._list_meta(base).items():
                parts = name[len(base):].split("/")
                depth = key_depth(parts[0]) if kind == "staging" else 1
                if len(parts) <= depth:
                    continue
                groups.setdefault("/".join(parts[:depth]), []).append(meta)
            for name, metas in sorted(groups.items()):
                out.append(Leftover(kind, name, max(t for _, t in metas), sum(n for n, _ in metas),
                                    f"s3://{self.bucket}/{base}{name}/"))
        return out

    def remove_leftover(self, item: Leftover) -> None:
        area = {"staging": ".staging", "quarantine": ".quarantine"}[item.kind]
        self._delete_prefix(self._obj(f"{area}/{item.name}") + "/")


class _RestoringStaging(Staging):
    """Staging for S3: on entry, pull a remote snapshot when the local dir is empty (a pod
    rescheduled to another node resumes from the last :meth:`S3Store.sync_staging`)."""

    def __init__(self, st: Staging, store: S3Store):
        super().__init__(st.key, st.path, st.lock_path)
        self._store = store

    def __enter__(self) -> "Staging":
        super().__enter__()
        try:
            self._store.restore_staging(self.key)
        except StoreError:
            pass
        return self


def _check_etag(body: bytes, etag: Optional[str], name: str) -> None:
    """A single-part object's ETag is the MD5 of its bytes: a damaged body is caught before it is
    parsed (multipart ETags, with a ``-N`` suffix, are not MD5s and are skipped)."""
    if not etag:
        return
    tag = etag.strip('"')
    if "-" in tag or len(tag) != 32:
        return
    if hashlib.md5(body).hexdigest() != tag:
        raise Retryable(f"{name}: body does not match its ETag (damaged in transfer)")
