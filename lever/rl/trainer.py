"""Utilities shared by the v2, RCE and GRPO loops: the per-epoch record, hooks, finite checks.

``metrics.jsonl`` and ``steps.jsonl`` are rewritten atomically after every epoch, so a killed run
leaves complete lines for the epochs it finished (the stage dir survives a kill).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from rich.console import Console

from lever.errors import StageError
from lever.selectors.checkpoint import atomic_write_bytes, atomic_write_json, json_safe as _json_safe

EpochHook = Callable[[str, int, dict], Optional[str]]

#: every per-epoch key (SPEC section 4); quantities a phase does not have are written as null
EPOCH_KEYS: tuple[str, ...] = (
    "phase", "epoch", "train_loss", "val_loss", "val_reward", "ppo_loss", "kl_k3", "kl_exact",
    "adv_std", "adv_max", "beta", "reward_mean", "reward_std", "zero_std_frac", "clip_frac",
    "entropy", "grad_norm",
)
_TABLE = ("epoch", "train_loss", "val_loss", "val_reward", "ppo_loss", "kl_k3", "kl_exact", "adv_std", "beta", "grad_norm")


class NonFiniteError(StageError):
    """A loss or gradient norm became NaN/inf: training stops instead of writing NaN weights."""

    def __init__(self, message: str, phase: str = "", what: str = "") -> None:
        super().__init__(message)
        self.phase, self.what = phase, what


def check_finite(value: torch.Tensor | float, what: str, phase: str, epoch: int, step: int) -> float:
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        raise NonFiniteError(f"{phase}: non-finite {what} ({v}) at epoch {epoch}, step {step}; stopping",
                             phase, what.replace(" ", "_"))
    return v


def clip_and_check(params: list[torch.nn.Parameter], max_norm: float, phase: str, epoch: int, step: int) -> float:
    """Clip gradients to ``max_norm`` and return the pre-clip norm; a NaN/inf norm raises."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return check_finite(norm, "grad norm", phase, epoch, step)


class EpochRecorder:
    """Writes metrics.jsonl / steps.jsonl, prints a table row, feeds telemetry and stop hooks."""

    def __init__(self, out: Path, telemetry: Any = None, on_epoch_end: Optional[list[EpochHook]] = None,
                 console: Optional[Console] = None) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.telemetry = telemetry
        # on_epoch_end hooks: ``hook(phase, epoch, metrics) -> reason | None``; a reason stops training
        # after this epoch (the divergence guard of lever.obs.guard is one)
        self.hooks = list(on_epoch_end or [])
        self.console = console or Console(stderr=True, width=160)
        self.epochs: list[dict] = []
        self.steps: list[dict] = []
        self._header = False
        self.stopped: Optional[dict] = None
        # rows a killed earlier attempt left in this staging dir; :meth:`restore` keeps those up to
        # the epoch the resume state holds, everything else starts empty
        # (the files are only rewritten at the next epoch end, so a kill in between loses nothing)
        self._previous = (_read_jsonl(self.out / "metrics.jsonl"), _read_jsonl(self.out / "steps.jsonl"))
        stopped = self.out / "stopped.json"
        if stopped.exists():  # an earlier attempt was stopped by a hook: the loops train no further
            try:
                self.stopped = json.loads(stopped.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                self.stopped = {"reason": "unreadable stopped.json"}
        if not (self.out / "metrics.jsonl").exists():
            atomic_write_bytes(self.out / "metrics.jsonl", b"")  # zero epochs -> an empty metrics.jsonl

    def restore(self, upto_epoch: int) -> None:
        """Resume: keep the earlier attempt's epoch and step rows with epoch <= ``upto_epoch``."""
        epochs, steps = self._previous
        self.epochs = [r for r in epochs if int(r.get("epoch", 0)) <= upto_epoch]
        self.steps = [r for r in steps if int(r.get("epoch", 0)) <= upto_epoch]

    def _flush(self) -> None:
        body = "".join(json.dumps(_json_safe(r), sort_keys=True) + "\n" for r in self.epochs)
        atomic_write_bytes(self.out / "metrics.jsonl", body.encode("utf-8"))
        body = "".join(json.dumps(_json_safe(r), sort_keys=True) + "\n" for r in self.steps)
        atomic_write_bytes(self.out / "steps.jsonl", body.encode("utf-8"))

    def step(self, phase: str, step: int, metrics: dict) -> None:
        row = {"phase": phase, "step": step, **metrics}
        self.steps.append(row)
        if self.telemetry is not None:
            self.telemetry.step(phase, step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def epoch(self, phase: str, epoch: int, metrics: dict) -> Optional[str]:
        """Record one epoch; returns a stop reason if a hook asked to stop (stopped.json written)."""
        row = {k: None for k in EPOCH_KEYS}
        row.update(metrics)
        row["phase"], row["epoch"] = phase, epoch
        self.epochs.append(row)
        self._flush()
        self._print(phase, row)
        if self.telemetry is not None:
            self.telemetry.epoch(phase, epoch, {k: v for k, v in row.items()
                                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for hook in self.hooks:
            reason = hook(phase, epoch, dict(row))
            if reason:
                self.stopped = {"phase": phase, "epoch": epoch, "reason": str(reason)}
                atomic_write_json(self.out / "stopped.json", self.stopped)
                self.console.print(f"[bold red]{phase}: stopped after epoch {epoch}: {reason}")
                return str(reason)
        return None

    def _print(self, phase: str, row: dict) -> None:
        def fmt(v: Any) -> str:
            if v is None:
                return "-"
            return f"{v:.4g}" if isinstance(v, float) else str(v)

        if not self._header:
            self.console.print(" | ".join(f"{c:>10}" for c in ("phase",) + _TABLE))
            self._header = True
        self.console.print(" | ".join(f"{fmt(row.get(c) if c != 'phase' else phase):>10}" for c in ("phase",) + _TABLE))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line of a killed writer (writes are atomic, so only foreign files)
    return rows


def mean(xs: list[float]) -> Optional[float]:
    return float(sum(xs) / len(xs)) if xs else None


@contextlib.contextmanager
def cpu_threads_for(model: torch.nn.Module, max_params: int = 5_000_000) -> Iterator[None]:
    """Run a small CPU model single-threaded, restoring the thread count afterwards.

    The selector's tensors are tiny (K x hidden per row); intra-op threading only adds
    synchronisation, and on a shared 2-core box it made LayerNorm ~100x slower (measured).
    GPU runs and large models are left alone.
    """
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    small = sum(p.numel() for p in model.parameters()) <= max_params
    if not (on_cpu and small):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def small_model_threads(fn: Callable) -> Callable:
    """Decorator: run ``fn(model, ...)`` inside :func:`cpu_threads_for` (model = first argument)."""

    @functools.wraps(fn)
    def wrapper(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        with cpu_threads_for(model):
            return fn(model, *args, **kwargs)

    return wrapper
