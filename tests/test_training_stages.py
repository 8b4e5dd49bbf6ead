"""The training stages end to end on synthetic upstream artifacts (no LVLM), per shipped plan."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from lever.config import list_plans, load_plan
from lever.errors import StageError
from lever.context import StageContext, UpstreamOutput
from lever.context import Unit
from lever.pipeline.graph import stage as graph_stage
from rl_synthetic import write_training_inputs
from lever.rl.trainer import EPOCH_KEYS
from lever.selectors.checkpoint import load_checkpoint, save_checkpoint
from lever.selectors.pointer import build_selector, sequence_logprob
from lever.stages import training as S

CHAIN = ("train-v2", "train-rce", "train-grpo", "select-checkpoint", "convert")


def _ctx(plan, name: str, ups: dict[str, list[Path]], out: Path, hooks=None) -> StageContext:
    inputs = {k: UpstreamOutput(k, [(Unit(k, (("shard", i),)), p) for i, p in enumerate(v)]) for k, v in ups.items()}
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(plan=plan, stage=name, unit=Unit(name), inputs=inputs, out=out)
    if hooks:
        ctx.on_epoch_end = hooks
    return ctx


def run_chain(plan, root: Path, upto: str = "convert", hooks=None) -> dict[str, list[Path]]:
    ups = write_training_inputs(root / "in", n_items=96, n_queries=32)
    for name in CHAIN:
        out = root / name
        getattr(S, name.replace("-", "_"))(_ctx(plan, name, {k: ups[k] for k in graph_stage(name).inputs}, out, hooks))
        ups[name] = [out]
        if name == upto:
            break
    return ups


def _lp(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, c = torch.randn(3, model.embed_dim, generator=g), torch.randn(3, 9, model.embed_dim, generator=g)
    with torch.no_grad():
        return sequence_logprob(model.eval(), q, c, torch.tensor([[0, 1], [8, 3], [4, 2]]))


@pytest.mark.slow
@pytest.mark.parametrize("name", list_plans())
def test_plan_trains_end_to_end(name, tmp_path, record_property):
    """Every shipped plan trains v2 -> convert on tiny RL data.  The time is recorded (shown with
    ``-rA`` / in junit XML), never asserted: speed is measured, not a pass/fail condition."""
    plan = load_plan(name, profile="tiny")
    if plan.grpo.rollout == "online":
        # online rollouts need the dataset and the LVLM, which these synthetic inputs do not have:
        # the chain runs offline here; the online loop is tested on the tiny LVLM in
        # tests/test_rl_online.py and end to end in tests/test_testbed_learning.py
        plan = load_plan(name, profile="tiny", overrides=["grpo.rollout=offline"])
    t = time.perf_counter()
    run_chain(plan, tmp_path)
    elapsed = time.perf_counter() - t
    record_property("train_seconds", round(elapsed, 2))
    print(f"{name}: trained v2 -> convert in {elapsed:.1f}s")
    sel = json.loads((tmp_path / "select-checkpoint" / "selected.json").read_text())
    assert sel["reason"] and sel["kind"] == "pointer"
    m_sel, _ = load_checkpoint(tmp_path / "select-checkpoint" / "selected")
    m_v2f, meta = load_checkpoint(tmp_path / "convert" / "v2format")
    assert meta["layout"] == "v2" and torch.equal(_lp(m_sel), _lp(m_v2f))
    rce_rows = [json.loads(x) for x in (tmp_path / "train-rce" / "metrics.jsonl").read_text().splitlines()]
    grpo_rows = [json.loads(x) for x in (tmp_path / "train-grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rce_rows) == plan.rce.epochs
    expected_grpo = plan.grpo.epochs
    assert len(grpo_rows) == expected_grpo
    for r in rce_rows + grpo_rows:
        assert set(EPOCH_KEYS) <= set(r)
    if grpo_rows:
        assert sel["stage"] == "train-grpo"
        for key in ("ppo_loss", "kl_k3", "kl_exact", "adv_std", "adv_max", "beta", "clip_frac", "entropy", "val_reward"):
            assert all(isinstance(r[key], float) for r in grpo_rows), key
    elif plan.selector_source == "v3" and plan.rce.epochs:
        assert sel["stage"] == "train-rce"
    if plan.grpo.curriculum.enabled:
        info = json.loads((tmp_path / "train-grpo" / "grpo_info.json").read_text())
        phases = [r.get("curriculum_phase") for r in grpo_rows]
        if info["phase1"] != "skipped":
            assert phases.count(1) == plan.grpo.curriculum.phase1_epochs
        assert phases.count(2) == plan.grpo.curriculum.phase2_epochs
    print(f"{name}: {elapsed:.1f}s")


def test_zero_epochs_write_only_an_empty_metrics_file(tmp_path):
    plan = load_plan("baseline", profile="tiny", overrides=["rce.epochs=0"])
    run_chain(plan, tmp_path)
    assert sorted(p.name for p in (tmp_path / "train-rce").iterdir()) == ["metrics.jsonl"]
    assert (tmp_path / "train-rce" / "metrics.jsonl").read_text() == ""
    sel = json.loads((tmp_path / "select-checkpoint" / "selected.json").read_text())
    assert sel["stage"] == "train-v2"


def _fake_run(dir: Path, prefix: str, vals: list[tuple[float, float]]) -> None:
    m = build_selector(8, load_plan("baseline", profile="tiny").selector, seed=0)
    dir.mkdir(parents=True)
    lines = []
    for e, (vl, vr) in enumerate(vals, 1):
        save_checkpoint(dir / f"{prefix}_epoch{e}", m, epoch=e, phase=prefix)
        lines.append(json.dumps({"phase": prefix, "epoch": e, "val_loss": vl, "val_reward": vr}))
    (dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "strategy, extra, expected",
    [("val_loss", [], 2), ("val_reward", [], 3), ("last", [], 4), ("epoch", ["checkpoint.epoch=1"], 1)],
)
def test_select_checkpoint_strategies(tmp_path, strategy, extra, expected):
    plan = load_plan("plan1", profile="tiny", overrides=[f"checkpoint.strategy={strategy}", *extra])
    _fake_run(tmp_path / "rce", "rce", [(3.0, 0.1)] * 2)
    _fake_run(tmp_path / "grpo", "grpo", [(2.0, 0.5), (1.0, 0.6), (1.5, 0.9), (1.2, 0.7)])
    save_checkpoint(tmp_path / "v2" / "model", build_selector(8, plan.selector))
    ups = {"train-v2": [tmp_path / "v2"], "train-rce": [tmp_path / "rce"], "train-grpo": [tmp_path / "grpo"]}
    S.select_checkpoint(_ctx(plan, "select-checkpoint", ups, tmp_path / "out"))
    sel = json.loads((tmp_path / "out" / "selected.json").read_text())
    assert sel["checkpoint"] == f"grpo_epoch{expected}" and sel["epoch"] == expected and sel["strategy"] == strategy
    assert (tmp_path / "out" / "selected.safetensors").read_bytes() == \
        (tmp_path / "grpo" / f"grpo_epoch{expected}.safetensors").read_bytes()


def test_select_checkpoint_missing_epoch_and_rollback(tmp_path):
    plan = load_plan("plan1", profile="tiny", overrides=["checkpoint.strategy=epoch", "checkpoint.epoch=7"])
    _fake_run(tmp_path / "rce", "rce", [(3.0, 0.1)])
    _fake_run(tmp_path / "grpo", "grpo", [(2.0, 0.5), (1.0, 0.6), (1.5, 0.9)])
    save_checkpoint(tmp_path / "v2" / "model", build_selector(8, plan.selector))
    ups = {"train-v2": [tmp_path / "v2"], "train-rce": [tmp_path / "rce"], "train-grpo": [tmp_path / "grpo"]}
    with pytest.raises(StageError, match=r"checkpoint.epoch=7 has no checkpoint; available epochs: \[1, 2, 3\]"):
        S.select_checkpoint(_ctx(plan, "select-checkpoint", ups, tmp_path / "out"))
    (tmp_path / "grpo" / "stopped.json").write_text(json.dumps({"phase": "grpo", "epoch": 3, "reason": "rollback: KL 9 > 5"}))
    plan = load_plan("plan1", profile="tiny")  # strategy last, but the guard asked for a rollback
    S.select_checkpoint(_ctx(plan, "select-checkpoint", ups, tmp_path / "out2"))
    sel = json.loads((tmp_path / "out2" / "selected.json").read_text())
    assert sel["epoch"] == 2 and "rollback" in sel["reason"]


def test_external_hook_stops_grpo_and_select_uses_what_exists(tmp_path):
    plan = load_plan("plan5", profile="tiny")

    def hook(phase, epoch, metrics):
        return "test stop" if phase == "grpo" and epoch == 3 else None

    run_chain(plan, tmp_path, hooks=[hook])
    stopped = json.loads((tmp_path / "train-grpo" / "stopped.json").read_text())
    assert stopped == {"phase": "grpo", "epoch": 3, "reason": "test stop"}
    assert len((tmp_path / "train-grpo" / "metrics.jsonl").read_text().splitlines()) == 3
    sel = json.loads((tmp_path / "select-checkpoint" / "selected.json").read_text())
    assert sel["stage"] == "train-grpo" and 1 <= sel["epoch"] <= 3


def test_embedding_dimension_mismatch_is_a_stage_error(tmp_path):
    plan = load_plan("baseline", profile="tiny")
    ups = run_chain(plan, tmp_path, upto="train-v2")
    other = write_training_inputs(tmp_path / "other", n_items=96, dim=12, n_queries=32)
    ctx = _ctx(plan, "train-rce", {"export-embeddings": other["export-embeddings"],
                                   "generate-rl-data": ups["generate-rl-data"], "train-v2": ups["train-v2"]},
               tmp_path / "rce")
    with pytest.raises(StageError, match="embed_dim=16 but the embeddings have d=12"):
        S.train_rce(ctx)


def test_require_positive_filters_training_groups(tmp_path):
    plan = load_plan("plan1", profile="tiny", overrides=["grpo.require_positive=true", "grpo.epochs=1"])
    run_chain(plan, tmp_path, upto="train-grpo")
    info = json.loads((tmp_path / "train-grpo" / "grpo_info.json").read_text())
    from lever.rl.data import read_rl_data
    from lever.rl.validation import split_records
    train, _ = split_records(read_rl_data(sorted((tmp_path / "in").glob("rl*"))), plan.validation.val_fraction)
    with_pos = sum(1 for r in train if any(c["correct"] for c in r["candidates"]))
    assert info["train_groups"] == with_pos < len(train)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at", [2, 3, 5])
def test_curriculum_grpo_resumes_bit_identical_after_a_kill(tmp_path, kill_at):
    """Killed inside an epoch hook (phase 1, its last epoch, or phase 2) and rerun on the same dir."""
    plan = load_plan("plan9", profile="tiny", overrides=[
        "grpo.epochs=6", "grpo.curriculum.phase1_epochs=3", "grpo.curriculum.phase2_epochs=3",
        "grpo.curriculum.high_gap=0.5", "grpo.curriculum.medium_gap=0.3", "grpo.lr=1e-3",
        "grpo.updates_per_round=2", "grpo.adaptive_beta.enabled=true", "grpo.adaptive_beta.kl_high=0.0"])
    ups = run_chain(plan, tmp_path / "full", upto="train-rce")
    grpo_in = {k: ups[k] for k in graph_stage("train-grpo").inputs}
    S.train_grpo(_ctx(plan, "train-grpo", grpo_in, tmp_path / "full" / "grpo"))

    def killer(phase, epoch, row):
        if epoch == kill_at:
            raise _Killed()

    out = tmp_path / "killed"
    with pytest.raises(_Killed):
        S.train_grpo(_ctx(plan, "train-grpo", grpo_in, out, [killer]))
    seen = []
    S.train_grpo(_ctx(plan, "train-grpo", grpo_in, out, [lambda p, e, r: seen.append(e)]))
    assert seen == list(range(kill_at, 7))
    full = tmp_path / "full" / "grpo"
    assert (out / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    assert (out / "grpo_epoch6.safetensors").read_bytes() == (full / "grpo_epoch6.safetensors").read_bytes()
    info = json.loads((out / "grpo_info.json").read_text())
    assert info == json.loads((full / "grpo_info.json").read_text()) and info["phase1"] != "skipped"


def test_train_v2_resumes_bit_identical_after_a_kill(tmp_path):
    plan = load_plan("v2", profile="tiny", overrides=["selector.dropout=0.3", "v2.epochs=4"])
    ups = write_training_inputs(tmp_path / "in", n_items=96, n_queries=32)
    v2_in = {k: ups[k] for k in graph_stage("train-v2").inputs}
    S.train_v2(_ctx(plan, "train-v2", v2_in, tmp_path / "full"))

    def killer(phase, epoch, row):
        if epoch == 3:
            raise _Killed()

    with pytest.raises(_Killed):
        S.train_v2(_ctx(plan, "train-v2", v2_in, tmp_path / "killed", [killer]))
    seen = []
    S.train_v2(_ctx(plan, "train-v2", v2_in, tmp_path / "killed", [lambda p, e, r: seen.append(e)]))
    assert seen == [3, 4]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert (killed / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    assert (killed / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    assert json.loads((killed / "model.json").read_text()) == json.loads((full / "model.json").read_text())


def test_non_finite_loss_is_flagged_to_telemetry_and_fails_the_stage(tmp_path):
    from lever.rl.trainer import NonFiniteError

    plan = load_plan("baseline", profile="tiny")
    ups = run_chain(plan, tmp_path, upto="train-v2")
    model, meta = load_checkpoint(ups["train-v2"][0] / "model")
    with torch.no_grad():
        model.score_q.bias.fill_(float("nan"))
    save_checkpoint(tmp_path / "bad_v2" / "model", model, phase="v2")
    flagged = []

    class Tele:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def nonfinite(self, phase, what):
            flagged.append((phase, what))

    ctx = _ctx(plan, "train-rce", {"export-embeddings": ups["export-embeddings"], "train-v2": [tmp_path / "bad_v2"],
                                   "generate-rl-data": ups["generate-rl-data"]}, tmp_path / "rce")
    ctx.telemetry = Tele()
    with pytest.raises(NonFiniteError, match="rce: non-finite loss .* at epoch 1, step 0"):
        S.train_rce(ctx)
    assert flagged == [("rce", "loss")]
