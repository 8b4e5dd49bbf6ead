"""Which store backend a store URL names.

Apart from ``store.py`` (the interface and the local backend) because it must know every
backend, and the S3 backend builds on the interface: one module holding both made an import
circle.
"""

from __future__ import annotations

import os
from typing import Optional

from lever.storage.s3 import S3Store
from lever.storage.store import LocalStore, Store

DEFAULT_STORE = "./lever-store"


def open_store(url: Optional[str] = None, cache_dir: Optional[str] = None) -> Store:
    """``DIR`` -> LocalStore, ``s3://bucket/prefix`` -> S3Store (endpoint/credentials from the
    environment).  None -> ``$LEVER_STORE`` or ``./lever-store``."""
    url = url or os.environ.get("LEVER_STORE") or DEFAULT_STORE
    if url.startswith("s3://"):
        rest = url[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"store {url!r}: missing bucket name (s3://BUCKET/PREFIX)")
        return S3Store(bucket, prefix.strip("/"), cache_dir=cache_dir)
    if "://" in url:
        raise ValueError(f"store {url!r}: only local directories and s3:// URLs are supported")
    return LocalStore(url)
