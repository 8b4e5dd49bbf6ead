"""The one epoch loop behind v2, RCE, offline GRPO and online GRPO.

The four trainers differ only in what one epoch does (their batches, losses and metrics) and in a
few numbers they carry between epochs (GRPO's KL coefficient, its round position and old policy,
online GRPO's starting held-out reward).  Everything else is shared here, so a fix to resuming,
recording or stopping reaches every trainer at once:

* resume: load ``{prefix}_state.safetensors`` (weights, AdamW, shuffle generator, torch RNG) and
  continue after its epoch; the recorder keeps the earlier attempt's rows up to that epoch;
* a run that a hook stopped before trains no further;
* per epoch, in this order: train, evaluate, per-epoch checkpoint (``save``), the phase's
  end-of-epoch update (adaptive beta), the metrics row with its hooks (divergence guard,
  telemetry), then the resume state, so a kill between any two of them resumes bit-identically;
* every optimizer step checks the loss and the gradient norm for NaN/inf before weights change.

A trainer builds its :class:`Loop` (model, optimizer, generator) and its :class:`EpochPhase` inside
:func:`forked_seed` and hands both to :func:`run_epochs`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm import tqdm

from lever.rl.resume import TrainState, load_state, restore, save_state
from lever.rl.trainer import EpochRecorder, check_finite, clip_and_check
from lever.selectors.pointer import PointerSelector

SaveFn = Callable[[PointerSelector, int, dict], None]


@dataclass
class Loop:
    """What every phase's epoch uses: the model and its optimizer, the shuffle generator, the
    recorder and the global optimizer-step counter (the tau schedule and steps.jsonl count it)."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    gen: torch.Generator
    recorder: EpochRecorder
    phase: str
    grad_clip: float
    step: int = 0

    def progress(self, n: int, desc: str) -> Any:
        """The per-epoch progress bar over ``range(n)`` (hidden when stderr is not a terminal)."""
        return tqdm(range(n), desc=desc, leave=False, disable=None)

    def optimize(self, loss: torch.Tensor, epoch: int) -> tuple[float, float]:
        """One optimizer step on ``loss``; returns (loss, pre-clip grad norm).  A NaN/inf loss or
        norm raises :class:`~lever.rl.trainer.NonFiniteError` before the weights change."""
        lv = check_finite(loss, "loss", self.phase, epoch, self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = clip_and_check(self.params, self.grad_clip, self.phase, epoch, self.step)
        self.opt.step()
        return lv, gn

    def record_step(self, epoch: int, metrics: dict) -> None:
        """One steps.jsonl row at the current global step."""
        self.recorder.step(self.phase, self.step, {"epoch": epoch, **metrics})


class EpochPhase:
    """What one trainer does per epoch; the defaults suit a phase with nothing to carry over."""

    def train_epoch(self, loop: Loop, epoch: int) -> dict:
        """Train one epoch; returns its training metrics (the metrics row minus validation)."""
        raise NotImplementedError

    def evaluate(self, loop: Loop, epoch: int) -> dict:
        """Validation metrics after the epoch (merged into the row after the training metrics)."""
        raise NotImplementedError

    def begin(self, loop: Loop) -> None:
        """Called once before the first epoch this attempt trains (after any resume)."""

    def end_epoch(self, row: dict) -> None:
        """After the epoch's checkpoint, before its row is recorded (GRPO adapts beta here)."""

    def resume_fields(self) -> dict[str, Any]:
        """Extra keyword arguments of :func:`~lever.rl.resume.save_state` (beta, round, extra)."""
        return {}

    def restore_fields(self, state: TrainState) -> None:
        """Take back what :meth:`resume_fields` saved."""


@dataclass
class LoopResult:
    rows: list[dict]  # this attempt's rows (a resumed attempt's restored rows are in the recorder)
    stopped: bool  # a hook stopped training, in this attempt or an earlier one on the same dir


def run_epochs(
    phase: EpochPhase, loop: Loop, *, first_epoch: int, last_epoch: int, save: Optional[SaveFn] = None,
    state_path: Optional[Path] = None, fingerprint: str = "",
) -> LoopResult:
    """Epochs ``first_epoch`` .. ``last_epoch`` of ``phase`` (resuming after the epoch a state at
    ``state_path`` holds)."""
    first = first_epoch
    st = load_state(state_path, fingerprint) if state_path is not None else None
    if st is not None:
        restore(st, loop.model, loop.opt, loop.gen)
        first, loop.step = st.epoch + 1, st.global_step
        phase.restore_fields(st)
        loop.recorder.restore(st.epoch)
    rows: list[dict] = []
    if loop.recorder.stopped is not None:  # a hook stopped an earlier attempt on this dir
        return LoopResult(rows, True)
    phase.begin(loop)
    for epoch in range(first, last_epoch + 1):
        row = phase.train_epoch(loop, epoch)
        row.update(phase.evaluate(loop, epoch))
        if save is not None:
            save(loop.model, epoch, row)
        rows.append(row)
        phase.end_epoch(row)
        stop = loop.recorder.epoch(loop.phase, epoch, row)  # hooks run before the resume state is written
        if state_path is not None:
            save_state(state_path, model=loop.model, opt=loop.opt, gen=loop.gen, epoch=epoch, global_step=loop.step,
                       fingerprint=fingerprint, **phase.resume_fields())
        if stop:
            return LoopResult(rows, True)
    return LoopResult(rows, False)


@contextlib.contextmanager
def forked_seed(seed: int) -> Iterator[None]:
    """A forked torch RNG scope seeded with ``seed``: dropout is reproducible and the caller's RNG
    is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
