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

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from lever.pipeline.store import (
    MANIFEST,
    CorruptArtifact,
    Staging,
    Store,
    StoreError,
    atomic_write_json,
    build_manifest,
    check_key,
    iter_files,
    sha256_file,
    utc_now,
    verify_dir,
)

_MULTIPART_THRESHOLD = 64 * 1024 * 1024


def make_client() -> Any:
    """A boto3 S3 client with retries (throttling and 5xx back off) and path-style addressing
    for custom endpoints (MinIO needs it)."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("LEVER_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    cfg = Config(
        region_name=region,
        retries={"max_attempts": int(os.environ.get("LEVER_S3_MAX_ATTEMPTS", "8")), "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)


def _is_not_found(exc: Exception) -> bool:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


class S3Store(Store):
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

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client()
        return self._client

    def _obj(self, key: str, rel: str = "") -> str:
        """Object name of a key (or a file in it).  Internal areas (``.staging/``,
        ``.quarantine/``) are prefixed to an already-checked key."""
        area, sep, rest = key.partition("/")
        checked = f"{area}/{check_key(rest)}" if area in (".staging", ".quarantine") and sep else check_key(key)
        parts = [p for p in (self.prefix, checked, rel) if p]
        return "/".join(parts)

    def _get_bytes(self, name: str) -> Optional[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=name)["Body"].read()
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise StoreError(f"{self.url}: reading {name}: {exc}") from None
        except BotoCoreError as exc:
            raise StoreError(f"{self.url}: reading {name}: {exc}") from None

    def _list(self, name_prefix: str) -> dict[str, int]:
        """Object name -> size under a prefix."""
        from botocore.exceptions import BotoCoreError, ClientError

        out: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=name_prefix):
                for obj in page.get("Contents", []):
                    out[obj["Key"]] = obj["Size"]
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"{self.url}: listing {name_prefix}: {exc}") from None
        return out

    def _upload(self, path: Path, name: str) -> None:
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.upload_file(str(path), self.bucket, name,
                                    Config=TransferConfig(multipart_threshold=_MULTIPART_THRESHOLD))
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"{self.url}: uploading {name}: {exc}") from None

    def _download(self, name: str, path: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, name, str(path))
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"{self.url}: downloading {name}: {exc}") from None

    def _delete_prefix(self, name_prefix: str) -> None:
        names = list(self._list(name_prefix))
        for i in range(0, len(names), 1000):
            self.client.delete_objects(Bucket=self.bucket,
                                       Delete={"Objects": [{"Key": n} for n in names[i:i + 1000]], "Quiet": True})

    # -- Store interface --------------------------------------------------------------------
    def manifest(self, key: str) -> Optional[dict]:
        raw = self._get_bytes(self._obj(key, MANIFEST))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            return {"_unreadable": str(exc)}
        return data if isinstance(data, dict) else {"_unreadable": "not a JSON object"}

    def check(self, key: str) -> Optional[list[str]]:
        """Committed = manifest present; intact = every listed object present with its size.
        Content hashes are checked on download (:meth:`open`), before any stage reads a byte."""
        m = self.manifest(key)
        if m is None:
            return None
        if "_unreadable" in m or not isinstance(m.get("files"), dict):
            return [f"{MANIFEST}: unreadable"]
        present = self._list(self._obj(key) + "/")
        problems = []
        for rel, info in m["files"].items():
            size = present.get(self._obj(key, rel))
            if size is None:
                problems.append(f"{rel}: missing")
            elif size != info.get("size"):
                problems.append(f"{rel}: size {size} != manifest {info.get('size')}")
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
        if (local / MANIFEST).is_file():
            try:
                same = json.loads((local / MANIFEST).read_text()) == m
            except ValueError:
                same = False
            if same and not verify_dir(local, m):
                self._checked[key] = stamp
                return local
        incoming = self.cache / ".incoming" / f"{key.replace('/', '__')}-{os.getpid()}"
        shutil.rmtree(incoming, ignore_errors=True)
        problems = []
        for rel, info in m["files"].items():
            dest = incoming / rel
            for attempt in range(2):  # one re-download: a truncated body is a transfer fault
                self._download(self._obj(key, rel), dest)
                if dest.stat().st_size == info.get("size") and sha256_file(dest) == info.get("sha256"):
                    break
            else:
                problems.append(f"{rel}: downloaded bytes do not match the manifest's sha256/size")
        if problems:
            shutil.rmtree(incoming, ignore_errors=True)
            raise CorruptArtifact(key, problems)
        atomic_write_json(incoming / MANIFEST, m)
        shutil.rmtree(local, ignore_errors=True)
        local.parent.mkdir(parents=True, exist_ok=True)
        os.rename(incoming, local)
        self._checked[key] = stamp
        return local

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

    def commit(self, key: str, meta: dict) -> dict:
        staging = self.cache / ".staging" / check_key(key)
        manifest = build_manifest(staging, key, meta)
        for rel in manifest["files"]:
            self._upload(staging / rel, self._obj(key, rel))
        body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._obj(key, MANIFEST), Body=body,
                                   ContentType="application/json")
        except Exception as exc:  # botocore errors; the artifact stays uncommitted
            raise StoreError(f"{self.url}: committing {key}: {exc}") from None
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

    def quarantine(self, key: str, reason: str) -> str:
        dest = self._obj(".quarantine/" + key.replace("/", "__") + "-" + utc_now().replace(":", ""))
        raw = self._get_bytes(self._obj(key, MANIFEST))
        record = {"key": key, "reason": reason, "at": utc_now(),
                  "manifest": raw.decode(errors="replace") if raw else None}
        self.client.put_object(Bucket=self.bucket, Key=dest + "/_quarantine.json",
                               Body=json.dumps(record, indent=2).encode())
        # manifest first: the artifact stops being "committed" before its files go
        self.client.delete_object(Bucket=self.bucket, Key=self._obj(key, MANIFEST))
        self._delete_prefix(self._obj(key) + "/")
        shutil.rmtree(self.cache / "objects" / key, ignore_errors=True)
        self._checked.pop(key, None)
        return f"s3://{self.bucket}/{dest}"

    def discard_staging(self, key: str) -> None:
        shutil.rmtree(self.cache / ".staging" / check_key(key), ignore_errors=True)
        self._delete_prefix(self._obj(".staging/" + key) + "/")

    def put_json(self, key: str, obj: Any) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._obj(key),
                               Body=(json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(),
                               ContentType="application/json")

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
