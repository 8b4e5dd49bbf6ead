"""Kill-and-resume: training continues from its last epoch state and ends bit-identical.

A training stage is killed after epoch k (an epoch hook raises, as a SIGKILL at that point
would leave the staging directory) and run again on the same staging directory.  The rerun must
execute only the remaining epochs and end with weights ``torch.equal`` to an uninterrupted run's,
and the same metrics -- which needs the optimizer moments, the shuffle generator, torch's RNG
(dropout), beta and the step counter (tau schedule) back exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lever.config import load_plan
from lever.context import StageContext, UpstreamOutput
from lever.context import Unit
from rl_synthetic import write_training_inputs
from lever.selectors.checkpoint import save_checkpoint
from lever.selectors.pointer import build_selector


class Killed(Exception):
    """Stands in for the SIGKILL: raised by an epoch hook after the epoch's checkpoint is written."""


def _inputs(root: Path, plan) -> dict[str, UpstreamOutput]:
    ups = write_training_inputs(root, n_items=64, dim=8, n_queries=20, pool_size=8, shards=2, group_sizes=(3, 7))
    save_checkpoint(root / "v2" / "model", build_selector(8, plan.selector, seed=plan.seed), phase="v2")
    out = {name: UpstreamOutput(name, [(Unit(name, (("shard", i),)), p) for i, p in enumerate(paths)])
           for name, paths in ups.items()}
    out["train-v2"] = UpstreamOutput("train-v2", [(Unit("train-v2"), root / "v2")])
    return out


def _ctx(plan, stage: str, inputs, out: Path, hooks=()) -> StageContext:
    ctx = StageContext(plan=plan, stage=stage, unit=Unit(stage), inputs=inputs, out=out)
    ctx.epoch_hooks = list(hooks)  # type: ignore[attr-defined]
    return ctx


def _killer(at: int, seen: list):
    def hook(phase: str, epoch: int, row: dict):
        seen.append(epoch)
        if epoch == at:
            raise Killed(f"killed after {phase} epoch {epoch}")
        return None
    return hook


def _recorder(seen: list):
    def hook(phase: str, epoch: int, row: dict):
        seen.append(epoch)
        return None
    return hook


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs between {a} and {b}"


def _metrics(d: Path) -> list[str]:
    return (d / "metrics.jsonl").read_text().splitlines()


def _train(stage_fn, plan, stage, inputs, out, kill_at=None):
    seen: list[int] = []
    hooks = [_killer(kill_at, seen)] if kill_at else [_recorder(seen)]
    try:
        stage_fn(_ctx(plan, stage, inputs, out, hooks))
    except Killed:
        return seen, True
    return seen, False


@pytest.fixture(scope="module")
def rce_setup(tmp_path_factory):
    from lever.stages.training import train_rce

    root = tmp_path_factory.mktemp("rce")
    plan = load_plan("baseline", "tiny", ["rce.epochs=4", "rce.batch_size=4", "selector.dropout=0.3"])
    inputs = _inputs(root, plan)
    full = root / "full"
    seen, killed = _train(train_rce, plan, "train-rce", inputs, full)
    assert seen == [1, 2, 3, 4] and not killed
    return plan, inputs, full, root


def test_rce_killed_after_epoch_2_resumes_bit_identical(rce_setup):
    from lever.stages.training import train_rce

    plan, inputs, full, root = rce_setup
    out = root / "killed"
    seen, killed = _train(train_rce, plan, "train-rce", inputs, out, kill_at=2)
    assert killed and seen == [1, 2]
    seen, killed = _train(train_rce, plan, "train-rce", inputs, out)
    assert not killed
    # the hook fires before the epoch's state is saved, so epoch 2 is the one redone
    assert seen == [2, 3, 4], f"the rerun did not resume (epochs run: {seen})"
    for e in (1, 2, 3, 4):
        _same_tensors(full / f"rce_epoch{e}.safetensors", out / f"rce_epoch{e}.safetensors")
    assert _metrics(out) == _metrics(full)
    assert (out / "steps.jsonl").read_text() == (full / "steps.jsonl").read_text()


def test_rce_resume_needs_the_optimizer_state(rce_setup):
    """Control: resuming from the weights alone (state tensors zeroed) does not give the same
    result, so the test above really checks that the optimizer state is restored."""
    from lever.stages.training import train_rce

    plan, inputs, full, root = rce_setup
    out = root / "nostate"
    _train(train_rce, plan, "train-rce", inputs, out, kill_at=3)
    st = out / "rce_state.safetensors"
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(st), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(st))
    assert any(k.startswith("opt.") and "exp_avg" in k for k in tensors)
    save_file({k: (torch.zeros_like(v) if k.startswith("opt.") and "exp_avg" in k else v) for k, v in tensors.items()},
              str(st), metadata=meta)
    seen, _ = _train(train_rce, plan, "train-rce", inputs, out)
    assert seen == [3, 4]
    a, b = load_file(str(full / "rce_epoch4.safetensors")), load_file(str(out / "rce_epoch4.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kill_at", [1, 2])
def test_grpo_killed_resumes_bit_identical_with_adaptive_beta(tmp_path, kill_at):
    from lever.stages.training import train_grpo, train_rce

    plan = load_plan("plan1", "tiny", [
        "rce.epochs=1", "grpo.epochs=3", "grpo.batch_size=4", "grpo.updates_per_round=3",
        "grpo.adaptive_beta.enabled=true", "grpo.adaptive_beta.kl_low=0.5", "grpo.adaptive_beta.kl_high=1.0",
        "grpo.freeze_backbone=false", "grpo.lr=1e-3"])
    inputs = _inputs(tmp_path, plan)
    train_rce(_ctx(plan, "train-rce", inputs, tmp_path / "rce"))
    inputs["train-rce"] = UpstreamOutput("train-rce", [(Unit("train-rce"), tmp_path / "rce")])
    full = tmp_path / "full"
    seen, _ = _train(train_grpo, plan, "train-grpo", inputs, full)
    assert seen == [1, 2, 3]
    out = tmp_path / "killed"
    seen, killed = _train(train_grpo, plan, "train-grpo", inputs, out, kill_at=kill_at)
    assert killed
    seen, _ = _train(train_grpo, plan, "train-grpo", inputs, out)
    assert seen == list(range(kill_at, 4))
    for e in (1, 2, 3):
        _same_tensors(full / f"grpo_epoch{e}.safetensors", out / f"grpo_epoch{e}.safetensors")
    assert _metrics(out) == _metrics(full)
    betas = [json.loads(line)["beta"] for line in _metrics(full)]
    assert len(set(betas)) > 1, f"adaptive beta never moved ({betas}): the test would not catch a lost beta"


# -- a real SIGKILL of a training process ---------------------------------------------------------

DRIVER = r'''
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
import test_reliability_resume as t
from lever.config import load_plan
from lever.stages.training import train_rce
plan = load_plan("baseline", "tiny", ["rce.epochs=4", "rce.batch_size=4", "selector.dropout=0.3"])
inputs = t._inputs(Path(sys.argv[1]), plan) if not (Path(sys.argv[1]) / "v2").exists() else t._reuse(Path(sys.argv[1]))
stall = int(sys.argv[3])
def hook(phase, epoch, row):
    print(f"epoch {epoch}", flush=True)
    if epoch == stall:
        time.sleep(60)  # the test SIGKILLs us here
ctx = t._ctx(plan, "train-rce", inputs, Path(sys.argv[2]), [hook])
train_rce(ctx)
print("done", flush=True)
'''


def _reuse(root: Path) -> dict[str, UpstreamOutput]:
    out = {}
    for name, pat in (("export-embeddings", "emb"), ("generate-beams", "beams*"), ("generate-rl-data", "rl*")):
        paths = sorted(root.glob(pat))
        out[name] = UpstreamOutput(name, [(Unit(name, (("shard", i),)), p) for i, p in enumerate(paths)])
    out["train-v2"] = UpstreamOutput("train-v2", [(Unit("train-v2"), root / "v2")])
    return out


def test_sigkilled_training_process_resumes_bit_identical(rce_setup, tmp_path):
    plan, inputs, full, root = rce_setup
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    here = str(Path(__file__).resolve().parent)
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(out), "3", here],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.strip() == "epoch 3":
                time.sleep(0.2)
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, lines)
    done = subprocess.run([sys.executable, str(script), str(root), str(out), "0", here], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # killed inside epoch 3's hook, before its state was saved: the rerun redoes 3, then 4
    assert done.stdout.split("\n")[:3] == ["epoch 3", "epoch 4", "done"], done.stdout
    _same_tensors(full / "rce_epoch4.safetensors", out / "rce_epoch4.safetensors")
