"""scripts/gpu_smoke.sh in its CPU mode (--tiny), as CI can run it: the same steps a person with a
GPU runs (processor, cluster-route load, fast vs plain in bf16, batched vs one-by-one generation,
a timed K=64 beam query), checked through the JSON report it writes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_smoke_tiny_mode_writes_a_passing_report(tmp_path):
    out = tmp_path / "smoke.json"
    res = subprocess.run(["bash", "scripts/gpu_smoke.sh", "--tiny", "--out", str(out), "--prompts", "15"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["ok"] is True and r["checks"] == {"processor": True, "fast_vs_plain": True, "batched_vs_single": True}
    assert r["processor"] == {"class": "Qwen2_5_VLProcessor", "tokenizer": "Qwen2Tokenizer",
                              "image_processor": "Qwen2VLImageProcessorPil"}
    assert r["dtype"] == "bfloat16" and r["device"] == "cpu"
    s = r["scoring"]
    assert s["prompts"] == 15 and set(s["max_gap_by_icds"]) == {"0", "1", "2", "3", "4"}
    assert 0 <= s["max_abs_logprob_gap"] < s["tolerance"] == 0.02
    b = r["beam_query"]
    assert (b["K"], b["B"], b["S"]) == (64, 5, 2) and b["seconds"] > 0 and b["images"] == 65
    assert b["lm_tokens"] > 64 * b["image_tokens"]  # every candidate's suffix carries two images
    assert r["generation"]["identical"] == 15
