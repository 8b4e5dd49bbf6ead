"""The S3 client and how to read its errors, shared by the S3 store and the S3 leases.

Kept apart from ``s3.py`` so the lease backend (which the store opens) and the store both use
one client policy without importing each other.  Configuration comes from the environment only
(see ``lever.storage.s3``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from lever.storage.lease import LeaseError
from lever.storage.store import StoreError

#: S3 error codes worth another try: throttling, server-side and timeout errors
_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException",
                "500", "502", "503", "504", "BadDigest", "XAmzContentSHA256Mismatch"}
#: answers to a conditional request whose precondition did not hold (409: a concurrent
#: conditional write to the same key was in flight on AWS; the caller re-reads and decides)
_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class Retryable(Exception):
    """A transfer went wrong in a way a second try may fix (bad body checksum, short read)."""


def max_attempts() -> int:
    return max(1, int(os.environ.get("LEVER_S3_MAX_ATTEMPTS", "8")))



def make_client(*, connect_timeout: float = 10, read_timeout: float = 120, attempts: int = 2) -> Any:
    """A boto3 S3 client with path-style addressing for custom endpoints (MinIO needs it).  It
    makes one quick retry itself; :meth:`S3Store._retry` owns the real policy, because botocore
    does not retry a body that breaks or arrives damaged after the headers.  Lease heartbeats use
    short timeouts and one attempt: the next beat is their retry."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("LEVER_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # adaptive adds client-side rate limiting when a bucket throttles many workers at once
    mode = os.environ.get("LEVER_S3_RETRY_MODE", "standard")
    if mode not in ("standard", "adaptive", "legacy"):
        raise StoreError(f"LEVER_S3_RETRY_MODE={mode!r}: expected standard, adaptive or legacy")
    cfg = Config(
        region_name=region,
        retries={"max_attempts": attempts, "mode": mode},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)


def error_code(exc: BaseException) -> str:
    resp = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or (str(status) if status else "")


def is_not_found(exc: BaseException) -> bool:
    return error_code(exc) in ("404", "NoSuchKey", "NotFound")


def conflict(exc: BaseException) -> bool:
    """A conditional request's precondition failed (412), or a concurrent conditional write to the
    same key was in flight (409 ConditionalRequestConflict, AWS)."""
    return error_code(exc) in _CONFLICT_CODES


def unsupported(exc: BaseException, header: str) -> Optional[Exception]:
    """A clear error when the endpoint does not implement a conditional header (else None)."""
    if error_code(exc) in ("NotImplemented", "501"):
        return LeaseError(f"the S3 endpoint does not support conditional writes ({header}); Lever needs them "
                          "to keep concurrent runs from building the same unit (AWS S3, MinIO and Ceph RGW have "
                          "them). Upgrade the store, or set LEVER_LEASES=off to run without coordination "
                          "(then never run two plans on this store at once)")
    return None


def retryable(exc: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, Retryable):
        return True
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = (getattr(exc, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in _RETRY_CODES or int(status) >= 500
    if isinstance(exc, BotoCoreError):  # connection errors, timeouts, broken/checksum-failed bodies
        return True
    try:
        from boto3.exceptions import S3UploadFailedError

        if isinstance(exc, S3UploadFailedError):  # wraps the ClientError of a (multipart) upload
            text = str(exc)
            return not any(c in text for c in ("AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch"))
    except ImportError:  # pragma: no cover
        pass
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error

        if isinstance(exc, Urllib3Error):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, (ConnectionError, TimeoutError))
