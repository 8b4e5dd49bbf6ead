"""No credential is ever written to logs, manifests or reports.

The real tiny pipeline runs as ``lever run`` against an S3 server on loopback with credentials
that are unique strings; afterwards every object in the bucket, every file of the local cache,
the captured stdout/stderr (verbose logging on) and a rendered Argo Workflow are searched for them.
A control plants the secret in a file of the cache and checks the search finds it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
#: the tiny profile made smaller still (a few seconds): every stage still runs for real
SMALL = [a for kv in ("infer.num_samples=8", "report.bootstrap_samples=100", "beam.num_queries=8",
                      "rl_data.num_queries=8", "infer.shots=[1,2]", "lvlm.warmup_steps=0", "beam.shards=1",
                      "rl_data.shards=1", "infer.shards=2") for a in ("--set", kv)]


def _find(secrets: list[bytes], blobs: dict[str, bytes]) -> list[str]:
    return [f"{name} contains {s[:6].decode()}..." for name, data in blobs.items() for s in secrets if s in data]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.mark.slow
@pytest.mark.integration
def test_tiny_pipeline_on_s3_writes_no_credential_anywhere(tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    key_id = "AKIA" + uuid.uuid4().hex[:16].upper()
    secret = "sec-" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
    secrets = [key_id.encode(), secret.encode()]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                    "LEVER_S3_ENDPOINT": endpoint, "LEVER_CACHE_DIR": str(tmp_path / "cache"),
                    "HOME": str(tmp_path / "home"), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
        bucket = f"lever-{uuid.uuid4().hex[:8]}"
        direct = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=key_id, aws_secret_access_key=secret)
        direct.create_bucket(Bucket=bucket)
        run = subprocess.run([sys.executable, "-m", "lever", "run", "baseline", "--profile", "tiny",
                              "--store", f"s3://{bucket}/lever", "-v", "-j", "1", *SMALL],
                             cwd=str(HERE.parent), env=env, capture_output=True, timeout=600)
        assert run.returncode == 0, run.stderr.decode()[-3000:]
        render = subprocess.run([sys.executable, "-m", "lever", "render", "plan1"], cwd=str(HERE.parent), env=env,
                                capture_output=True, timeout=120)
        assert render.returncode == 0, render.stderr.decode()[-2000:]
        blobs: dict[str, bytes] = {"stdout": run.stdout, "stderr": run.stderr, "workflow": render.stdout}
        names = []
        for page in direct.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                names.append(o["Key"])
                blobs[f"s3://{bucket}/{o['Key']}"] = direct.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        assert any(n.endswith("/report.json") for n in names) and any(n.endswith("/_manifest.json") for n in names)
        cache = _tree(tmp_path / "cache")
        assert cache, "the run left no local cache to search"
        blobs.update(cache)
        blobs.update(_tree(tmp_path / "home"))
        assert _find(secrets, blobs) == []
        # control: the search does see a planted secret
        planted = tmp_path / "cache" / "planted.txt"
        planted.write_text(f"oops {secret}")
        assert _find(secrets, _tree(tmp_path / "cache"))
    finally:
        server.stop()
