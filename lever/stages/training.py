"""Training stages: train-v2, train-rce, train-grpo, select-checkpoint, convert (DESIGN.md).

Each is ``def stage(ctx: StageContext) -> None``.  The loops live in :mod:`lever.training.v2`,
:mod:`lever.rl.rce` and :mod:`lever.rl.grpo`; this module wires artifacts, configs, the epoch hooks
(the divergence guard from ``lever.obs.guard`` plus any ``on_epoch_end`` callables the caller
put on ``ctx.on_epoch_end``) and checkpoint writing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from lever.io import atomic_write_bytes
from lever.errors import StageError
from lever.context import StageContext
from lever.inference.variants import grpo_epochs_trained
from lever.rl.curriculum import bucket_counts, phase1_indices, positive_indices, quality_buckets
from lever.rl.data import read_rl_data, rl_data_stats
from lever.rl.groups import GroupData, build_groups
from lever.rl.grpo import frozen_copy, run_grpo
from lever.rl.rce import run_rce
from lever.rl.trainer import EpochHook, EpochRecorder, NonFiniteError
from lever.rl.validation import split_records
from lever.selectors.checkpoint import (

    atomic_write_json,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from lever.selectors.pointer import PointerSelector, build_selector
from lever.training.checkpoints import (
    available_epochs,
    choose_epoch,
    result_epoch,
    rows_by_epoch,
    stopped_info,
)
from lever.training.v2 import read_beams, run_v2

# -- inputs ---------------------------------------------------------------------------------------


def load_train_embeddings(dir: Path) -> torch.Tensor:
    """The ``train_query`` table [N, d] of an export-embeddings artifact (candidate = query row)."""
    try:
        from lever.models.embeddings import load_embeddings  # helper A's reader, when present
    except ImportError:
        load_embeddings = None
    if load_embeddings is not None:
        e = load_embeddings(dir)
        t = e["train_query"] if isinstance(e, dict) else getattr(e, "train_query")
        return torch.as_tensor(t, dtype=torch.float32)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(dir) / "embeddings.safetensors"
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise StageError(f"{path}: embeddings not found") from None
    except SafetensorError as e:
        raise StageError(f"{path}: unreadable safetensors ({e})") from None
    if "train_query" not in tensors:
        raise StageError(f"{path}: field 'train_query' missing (have {sorted(tensors)})")
    t = tensors["train_query"].float()
    if t.dim() != 2 or not torch.isfinite(t).all():
        raise StageError(f"{path}: field 'train_query' must be a finite [N, d] matrix")
    return t


def training_device() -> torch.device:
    """CUDA when present (the cluster's GPU pods), else CPU; the selector is small either way."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def epoch_hooks(ctx: StageContext) -> list[EpochHook]:
    hooks: list[EpochHook] = []
    try:
        from lever.obs.guard import make_guard
    except ImportError:
        make_guard = None
    if make_guard is not None:
        guard = make_guard(ctx.plan.alerts, ctx.log)
        if guard is not None:
            hooks.append(guard)
    hooks.extend(getattr(ctx, "on_epoch_end", None) or [])
    hooks.extend(getattr(ctx, "epoch_hooks", None) or [])  # the name the resume tests use
    return hooks


def _rl_groups(ctx: StageContext, emb: torch.Tensor) -> tuple[GroupData, GroupData, dict]:
    records = read_rl_data(ctx.input("generate-rl-data").paths())
    stats = rl_data_stats(records)
    ctx.log.info("RL data: %s", stats)
    if stats["eval_failed"]:
        ctx.log.warning("%d candidates with eval_failed excluded from their groups", stats["eval_failed"])
    train_recs, val_recs = split_records(records, ctx.plan.validation.val_fraction)
    n = emb.size(0)
    dev = emb.device
    train = build_groups(train_recs, n_items=n, reward_cfg=ctx.plan.reward).to(dev)
    val = build_groups(val_recs, n_items=n, reward_cfg=ctx.plan.reward).to(dev)
    return train, val, stats


def _check_dims(model: PointerSelector, emb: torch.Tensor, where: str) -> None:
    if model.embed_dim != emb.size(1):
        raise StageError(f"{where}: selector embed_dim={model.embed_dim} but the embeddings have d={emb.size(1)}")


def _saver(ctx: StageContext, prefix: str, phase: str) -> Callable[[PointerSelector, int, dict], None]:
    def save(model: PointerSelector, epoch: int, metrics: dict) -> None:
        save_checkpoint(ctx.out / f"{prefix}_epoch{epoch}", model, plan=ctx.plan.name, config_hash=ctx.config_hash,
                        epoch=epoch, phase=phase, metrics=metrics)
    return save


@contextlib.contextmanager
def _flag_nonfinite(ctx: StageContext) -> Iterator[None]:
    """Tell telemetry about a NaN/inf before the stage fails (the NaN alert fires on it)."""
    try:
        yield
    except NonFiniteError as e:
        nonfinite = getattr(ctx.telemetry, "nonfinite", None)
        if callable(nonfinite):
            nonfinite(e.phase, e.what)
        raise


def _fingerprint(ctx: StageContext, part: str = "") -> str:
    """What a resume state must match: this stage's config hash (and curriculum phase)."""
    return f"{ctx.stage}:{ctx.config_hash}:{part}"


def _already_stopped(ctx: StageContext) -> bool:
    """An earlier attempt on this staging dir was stopped by a hook: its outputs are final."""
    if (ctx.out / "stopped.json").exists():
        ctx.log.info("%s: stopped.json present in the staging dir; training already stopped", ctx.stage)
        return True
    return False


def _v2_model(ctx: StageContext) -> tuple[PointerSelector, dict]:
    return load_checkpoint(ctx.input("train-v2").path / "model")


# -- stages ---------------------------------------------------------------------------------------


def train_v2(ctx: StageContext) -> None:
    """CE on the InfoScore beams -> ``model.safetensors`` + ``model.json`` + ``metrics.jsonl``."""
    with _flag_nonfinite(ctx):
        _train_v2(ctx)


def _train_v2(ctx: StageContext) -> None:
    plan = ctx.plan
    emb = load_train_embeddings(ctx.input("export-embeddings").path).to(training_device())
    records, counts = read_beams(ctx.input("generate-beams").paths(), plan.v2.score_threshold)
    ctx.log.info("beams: %s", counts)
    if counts["beams_kept"] == 0 and plan.v2.epochs > 0:
        raise StageError(f"no beams left to train on (v2.score_threshold={plan.v2.score_threshold}; {counts})")
    tr, va = split_records(records, plan.validation.val_fraction)
    train = build_groups(tr, n_items=emb.size(0), reward_field="score").to(emb.device)
    val = build_groups(va, n_items=emb.size(0), reward_field="score").to(emb.device)
    model = build_selector(emb.size(1), plan.selector, seed=plan.seed).to(emb.device)
    rec = EpochRecorder(ctx.out, ctx.telemetry, epoch_hooks(ctx))
    rows = run_v2(model, emb, train, val, plan.v2, recorder=rec, seed=plan.seed,
                  state_path=ctx.out / "v2_state.safetensors", fingerprint=_fingerprint(ctx))
    rows = [r for r in rec.epochs]  # restored + new (a resumed attempt returns only the new ones)
    save_checkpoint(ctx.out / "model", model, plan=plan.name, config_hash=ctx.config_hash,
                    epoch=len(rows), phase="v2", metrics=rows[-1] if rows else {}, extra={"beams": counts})


def train_rce(ctx: StageContext) -> None:
    """RCE from the v2 weights -> ``rce_epochN`` checkpoints + metrics.jsonl (+ steps.jsonl)."""
    with _flag_nonfinite(ctx):
        _train_rce(ctx)


def _train_rce(ctx: StageContext) -> None:
    plan = ctx.plan
    if _already_stopped(ctx):
        return
    rec = EpochRecorder(ctx.out, ctx.telemetry, epoch_hooks(ctx))
    if plan.rce.epochs == 0:
        return
    emb = load_train_embeddings(ctx.input("export-embeddings").path).to(training_device())
    model, _ = _v2_model(ctx)
    _check_dims(model, emb, "train-v2 model")
    model.to(emb.device)
    train, val, _ = _rl_groups(ctx, emb)
    if len(train) == 0:
        raise StageError("RL data holds no trainable query groups (all empty or eval_failed)")
    run_rce(model, emb, train, val, plan.rce, recorder=rec, save=_saver(ctx, "rce", "rce"), seed=plan.seed,
            state_path=ctx.out / "rce_state.safetensors", fingerprint=_fingerprint(ctx))


def _grpo_start(ctx: StageContext) -> tuple[PointerSelector, str]:
    rce_dir = ctx.input("train-rce").path
    e = result_epoch(rce_dir, "rce")
    if e is None:
        model, _ = _v2_model(ctx)
        return model, "train-v2 model (RCE has no epochs)"
    model, _ = load_checkpoint(rce_dir / f"rce_epoch{e}")
    return model, f"rce_epoch{e}"


def train_grpo(ctx: StageContext) -> None:
    """GRPO from the RCE result -> ``grpo_epochN`` checkpoints + metrics.jsonl + steps.jsonl."""
    with _flag_nonfinite(ctx):
        _train_grpo(ctx)


def _train_grpo(ctx: StageContext) -> None:
    plan, g = ctx.plan, ctx.plan.grpo
    if _already_stopped(ctx):
        return
    rec = EpochRecorder(ctx.out, ctx.telemetry, epoch_hooks(ctx))
    if grpo_epochs_trained(plan) == 0:
        return
    cur = g.curriculum
    emb = load_train_embeddings(ctx.input("export-embeddings").path).to(training_device())
    model, start = _grpo_start(ctx)
    _check_dims(model, emb, start)
    model.to(emb.device)
    if g.reference == "rce":
        reference: Optional[PointerSelector] = frozen_copy(model)
    elif g.reference == "v2":
        reference = frozen_copy(_v2_model(ctx)[0].to(emb.device))
    else:
        reference = None
    train, val, _ = _rl_groups(ctx, emb)
    if g.require_positive:
        keep = positive_indices(train)
        ctx.log.info("require_positive: %d of %d train groups hold a correct candidate", len(keep), len(train))
        train = train.subset(keep)
    if len(train) == 0:
        raise StageError("no GRPO training groups left (empty RL data or require_positive removed all)")
    info = {"start": start, "reference": g.reference, "train_groups": len(train), "val_groups": len(val)}
    save = _saver(ctx, "grpo", "grpo")
    if g.rollout == "online":
        _online_grpo(ctx, model, emb, train, val, reference, rec, info)
        return
    if not cur.enabled:
        run_grpo(model, emb, train, val, g, epochs=g.epochs, reference=reference, recorder=rec, save=save,
                 seed=plan.seed, state_path=ctx.out / "grpo_state.safetensors", fingerprint=_fingerprint(ctx))
        atomic_write_json(ctx.out / "grpo_info.json", info)
        return
    if cur.phase1_epochs + cur.phase2_epochs != g.epochs:
        ctx.log.warning("curriculum runs phase1_epochs + phase2_epochs = %d epochs (grpo.epochs=%d ignored)",
                        cur.phase1_epochs + cur.phase2_epochs, g.epochs)
    buckets = quality_buckets(train, cur)
    info["buckets"] = bucket_counts(buckets)
    p1 = phase1_indices(train, cur)
    beta = g.kl_beta
    done = 0
    if len(p1) == 0 or cur.phase1_epochs == 0:
        ctx.log.warning("curriculum phase 1 skipped: %s", "no high/medium quality groups" if len(p1) == 0 else "0 epochs")
        info["phase1"] = "skipped"
    else:
        rows, beta, stopped = run_grpo(model, emb, train.subset(p1), val, g, epochs=cur.phase1_epochs,
                                       reference=reference, recorder=rec, save=save, seed=plan.seed,
                                       extra={"curriculum_phase": 1},
                                       state_path=ctx.out / "grpo_p1_state.safetensors",
                                       fingerprint=_fingerprint(ctx, "p1"))
        # epochs of phase 1, including those a resumed attempt restored instead of re-running
        done = max((int(r["epoch"]) for r in rec.epochs if r.get("curriculum_phase") == 1), default=0)
        if stopped:
            atomic_write_json(ctx.out / "grpo_info.json", info)
            return
        ck = plan.checkpoint
        epochs = [e for e in available_epochs(ctx.out, "grpo") if e <= done]
        e, why = choose_epoch({int(r["epoch"]): r for r in rec.epochs}, epochs, ck.strategy,
                              min(ck.epoch, epochs[-1]) if ck.strategy == "epoch" and ck.epoch else None)
        model, _ = load_checkpoint(ctx.out / f"grpo_epoch{e}")
        model.to(emb.device)
        info["phase1"] = {"groups": len(p1), "epochs": done, "selected_epoch": e, "reason": why}
    # phase 2 starts from phase 1's (possibly adapted) KL coefficient: the config is its one channel
    g2 = g.model_copy(update={"kl_beta": beta})
    run_grpo(model, emb, train, val, g2, epochs=cur.phase2_epochs, reference=reference, recorder=rec, save=save,
             seed=plan.seed + 1, start_epoch=done + 1, extra={"curriculum_phase": 2},
             state_path=ctx.out / "grpo_p2_state.safetensors", fingerprint=_fingerprint(ctx, "p2"))
    atomic_write_json(ctx.out / "grpo_info.json", info)


def online_judge(ctx: StageContext) -> Any:
    """The LVLM judge of online rollouts: the plan's LVLM and scoring path (as generate-rl-data
    uses them) behind the judged-sequence cache, which lives in the artifact store (a directory in
    the staging dir when the stage runs without one)."""
    import hashlib

    from lever.config.loader import config_hash
    from lever.data.dataset import load_stage_index
    from lever.models.factory import plan_lvlm
    from lever.rl.judge_cache import DirBackend, JudgeCache, namespace
    from lever.rl.online import OnlineJudge
    from lever.stages.sampling import make_scorer

    data_dir = ctx.input("prepare-data").path
    index = load_stage_index(ctx)
    digest = hashlib.sha256((data_dir / "dataset.json").read_bytes()).hexdigest()[:16]
    ns = namespace(config_hash(ctx.plan, ("lvlm",)), digest)
    store = getattr(ctx, "store", None)
    backend = store if store is not None else DirBackend(ctx.out / "judge_cache")
    lvlm = plan_lvlm(ctx.plan)
    ctx.log.info("online rollouts: judged-sequence cache namespace %s (%s)", ns,
                 "artifact store" if store is not None else "staging dir")
    return OnlineJudge(lvlm, list(index.train), JudgeCache(backend, ns), make_scorer(lvlm, ctx.plan.lvlm.fast))


def _online_grpo(ctx: StageContext, model: PointerSelector, emb: torch.Tensor, train: GroupData, val: GroupData,
                 reference: Optional[PointerSelector], rec: EpochRecorder, info: dict) -> None:
    from lever.rl.online import run_online_grpo

    plan, g = ctx.plan, ctx.plan.grpo
    judge = online_judge(ctx)
    _, extra = run_online_grpo(model, emb, train, val, g, judge=judge, reward_cfg=plan.reward, epochs=g.epochs,
                               reference=reference, recorder=rec, save=_saver(ctx, "grpo", "grpo"), seed=plan.seed,
                               state_path=ctx.out / "grpo_state.safetensors", fingerprint=_fingerprint(ctx))
    info.update({"rollout": "online", **extra, "judge_cache": judge.cache.ns})
    atomic_write_json(ctx.out / "grpo_info.json", info)


def _copy_checkpoint(src_stem: Path, out: Path, selection: dict[str, Any]) -> None:
    """selected.safetensors (bytes copied) + selected.json (the checkpoint meta + the selection)."""
    meta = read_meta(src_stem)
    atomic_write_bytes(out / "selected.safetensors", src_stem.with_suffix(".safetensors").read_bytes())
    atomic_write_json(out / "selected.json", {**meta, **selection})


def select_checkpoint(ctx: StageContext) -> None:
    """Choose the checkpoint inference uses (strategy val_loss | val_reward | last | epoch)."""
    plan, ck = ctx.plan, ctx.plan.checkpoint
    v2_dir = ctx.input("train-v2").path
    if plan.selector_source == "v2":
        _copy_checkpoint(v2_dir / "model", ctx.out, {
            "checkpoint": "model", "stage": "train-v2", "epoch": read_meta(v2_dir / "model").get("epoch", 0),
            "strategy": "selector_source", "reason": "selector_source is v2: the supervised v2 selector alone",
        })
        return
    for stage, prefix in (("train-grpo", "grpo"), ("train-rce", "rce")):
        d = ctx.input(stage).path
        epochs = available_epochs(d, prefix)
        if not epochs:
            continue
        rows = rows_by_epoch(d)
        e, why = choose_epoch(rows, epochs, ck.strategy, ck.epoch, stopped_info(d))
        if stage == "train-rce":
            why += " (GRPO has no epochs: choosing among RCE epochs)"
        _copy_checkpoint(d / f"{prefix}_epoch{e}", ctx.out, {
            "checkpoint": f"{prefix}_epoch{e}", "stage": stage, "epoch": e, "strategy": ck.strategy,
            "reason": why, "metrics": rows.get(e, {}),
        })
        ctx.log.info("selected %s_epoch%d: %s", prefix, e, why)
        return
    _copy_checkpoint(v2_dir / "model", ctx.out, {
        "checkpoint": "model", "stage": "train-v2", "epoch": 0, "strategy": ck.strategy,
        "reason": "neither RCE nor GRPO produced a checkpoint: using the v2 selector",
    })


def convert(ctx: StageContext) -> None:
    """selected -> ``v2format.safetensors`` + ``v2format.json`` (key layout ``v2``, see checkpoint.py)."""
    src = ctx.input("select-checkpoint").path / "selected"
    model, meta = load_checkpoint(src)
    selection = {k: meta[k] for k in ("checkpoint", "stage", "strategy", "reason") if k in meta}
    save_checkpoint(ctx.out / "v2format", model, plan=meta.get("plan", ctx.plan.name),
                    config_hash=meta.get("config_hash", ""), epoch=int(meta.get("epoch", 0)),
                    phase=meta.get("phase", ""), metrics=meta.get("metrics", {}), layout="v2",
                    extra={"converted_from": selection})


__all__ = ["train_v2", "train_rce", "train_grpo", "select_checkpoint", "convert", "load_train_embeddings"]
