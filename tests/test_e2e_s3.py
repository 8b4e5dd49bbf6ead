"""The real tiny pipeline through the CLI against a real HTTP S3 endpoint on loopback.

Checks the issue's "done when" on a shrunk tiny plan: report and manifests land in the bucket, a
re-run reports every stage cached in a fraction of the time, a GRPO-only change rebuilds only
GRPO and what follows, and no credential appears in anything written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from lever.config import load_plan
from lever.pipeline.runner import Pipeline, load_baseline
from lever.storage.s3 import S3Store
from s3_server import TEST_KEY_ID, TEST_SECRET, client, moto_s3

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SHRINK = ["beam.num_queries=8", "rl_data.num_queries=8", "infer.num_samples=8", "infer.shots=[1,2]",
          "rce.epochs=2", "grpo.epochs=2", "v2.epochs=2", "report.bootstrap_samples=200"]


def _lever(args, env, timeout=600):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "lever", *args], env=env, capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - t0


def _sets():
    return [x for s in SHRINK for x in ("--set", s)]


def test_tiny_plan_on_s3(monkeypatch, tmp_path):
    with moto_s3(monkeypatch) as (endpoint, bucket):
        env = dict(os.environ, LEVER_STORE_CACHE=str(tmp_path / "cache"), TQDM_DISABLE="1")
        url = f"s3://{bucket}/lever"
        p1, t1 = _lever(["run", "plan1", "--profile", "tiny", "--store", url, *_sets()], env)
        assert p1.returncode == 0, p1.stderr[-3000:]
        report = p1.stdout.strip().splitlines()[-1]
        assert report.startswith(f"{url}/summarize/") and report.endswith("/report.md")

        c = client(endpoint)
        rkey = report[len(f"s3://{bucket}/"):]
        rep = json.loads(c.get_object(Bucket=bucket, Key=rkey.replace("report.md", "report.json"))["Body"].read())
        assert rep["plan"] == "plan1" and rep["baseline_plan"] == "baseline" and not rep["partial"]
        # plan1 evaluates GRPO epochs 1, 2, 3; this run trains 2, so epochs 1 and 2 get rows
        assert set(rep["accuracy"]) == {"plan", "baseline", "epoch1", "epoch2", "random", "retrieval", "oracle"}
        assert rep["epoch_checkpoints"]["not_trained"] == [3]
        assert all(rep["accuracy"][row][s] is not None for row in ("plan", "epoch1", "epoch2") for s in ("1", "2"))
        assert rep["checkpoint"]["checkpoint"] == "grpo_epoch2"
        assert c.get_object(Bucket=bucket, Key=rkey.replace("report.md", "plots/accuracy.png"))["Body"].read()[:4] == b"\x89PNG"

        # one committed manifest per unit of both plans, each listing real objects
        plan = load_plan("plan1", "tiny", SHRINK)
        base = load_baseline(plan, "tiny", SHRINK)
        store = S3Store(bucket, "lever", cache_dir=tmp_path / "verify")
        for cfg, b in ((plan, base), (base, None)):
            pipe = Pipeline(cfg, store, baseline=b)
            for stage, units in pipe.keys.units.items():
                if cfg is base and stage == "summarize":
                    continue
                for u, _ in units:
                    assert store.check(pipe.key(stage, u)) == [], (cfg.name, stage, u.id)
        m = store.manifest(pipe.key("infer", pipe.select_units("infer")[0]))
        assert m["files"]["predictions.jsonl"]["size"] > 0 and m["lever_version"] and m["created"]

        # re-run: everything cached, in well under a tenth of the first run
        p2, t2 = _lever(["run", "plan1", "--profile", "tiny", "--store", url, *_sets()], env)
        assert p2.returncode == 0, p2.stderr[-3000:]
        stage_lines = [ln for ln in p2.stderr.splitlines() if re.match(r"\[\d+/\d+\]", ln)]
        assert stage_lines and all("cached" in ln for ln in stage_lines), stage_lines
        assert p2.stdout.strip().splitlines()[-1] == report
        assert t2 < t1 / 10 or t2 < 3.0, (t1, t2)

        # only a GRPO setting changes: GRPO and what follows rebuild, nothing else
        p3, _ = _lever(["run", "plan1", "--profile", "tiny", "--store", url, *_sets(), "--set", "grpo.kl_beta=0.05"], env)
        assert p3.returncode == 0, p3.stderr[-3000:]
        built = {m.group(1) for m in re.finditer(r"\] (?:baseline:)?([a-z0-9-]+)\s+built", p3.stderr)}
        assert built == {"train-grpo", "select-checkpoint", "convert", "infer", "summarize"}, built
        assert "baseline:" not in "".join(ln for ln in p3.stderr.splitlines() if "built" in ln)

        # report and compare commands read the same store
        p4, _ = _lever(["report", "plan1", "--profile", "tiny", "--store", url, *_sets()], env)
        assert p4.returncode == 0 and p4.stdout.strip() == report, p4.stderr[-2000:]
        p5, _ = _lever(["compare", "plan1", "baseline", "--profile", "tiny", "--store", url, *_sets(), "--markdown"], env)
        assert p5.returncode == 0, p5.stderr[-2000:]
        assert "| plan1 |" in p5.stdout and "| baseline |" in p5.stdout and "**" in p5.stdout

        # no credential in any object or in anything printed
        for out in (p1, p2, p3, p4, p5):
            assert TEST_SECRET not in out.stdout + out.stderr and TEST_KEY_ID not in out.stdout + out.stderr
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                body = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                assert TEST_SECRET.encode() not in body and TEST_KEY_ID.encode() not in body, o["Key"]
