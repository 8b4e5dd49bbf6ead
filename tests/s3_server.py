"""A real HTTP S3 endpoint on loopback for the store tests (moto's server mode, no patched client)."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import Iterator

TEST_KEY_ID = "AKIALEVERTEST0000001"
TEST_SECRET = "lever-test-secret-7f3c9a1e55b2"


@contextmanager
def moto_s3(monkeypatch) -> Iterator[tuple[str, str]]:
    """Start the server, point the environment at it, create a bucket; yields (endpoint, bucket)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("LEVER_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"lever-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    try:
        yield endpoint, bucket
    finally:
        server.stop()


def client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


@contextmanager
def moto_s3_behind_proxy(monkeypatch, env: dict[str, str], **proxy_kwargs) -> Iterator[tuple]:
    """:func:`moto_s3` with a :class:`s3_faults.FaultProxy` in front and Lever pointed at the proxy,
    so faults (or a gate serializing conditional requests) reach the real client code paths.
    ``env`` adds Lever's S3 settings for the test; yields (upstream, proxy, direct client, bucket)."""
    from s3_faults import FaultProxy

    with moto_s3(monkeypatch) as (upstream, bucket):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        proxy = FaultProxy(upstream, **proxy_kwargs).start()
        monkeypatch.setenv("LEVER_S3_ENDPOINT", proxy.url)
        try:
            yield upstream, proxy, client(upstream), bucket
        finally:
            proxy.stop()
