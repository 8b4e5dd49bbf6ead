"""Divergence guard: the alert thresholds, applied inside the training loop.

Alerts tell a human hours later; the guard acts at the epoch boundary with the same thresholds
(``AlertConfig``) and the same epoch-streak logic (``lever.obs.trends``), so a run that trips the
guard would also have fired the matching alert.

Hook contract (trainer ``on_epoch_end``): ``guard(phase, epoch, metrics) -> str | None``.

* ``None``: keep training.
* a string: stop after this epoch; the string is the human-readable reason (write it to
  ``stopped.json``).  When it starts with ``ROLLBACK_PREFIX`` (``"rollback: "``) the trainer must
  also make the best checkpoint so far (lowest val loss) the stage's result;
  ``parse_reason(reason) -> (rollback, message)`` splits it.

Modes (``alerts.guard``): ``off`` (no checks), ``warn`` (log only, never stops), ``stop``,
``rollback``.  Conditions that stop: KL above ``kl_max``, a non-finite loss/KL/grad norm,
advantage std below ``adv_std_floor`` for ``adv_std_epochs`` GRPO epochs, val loss rising for
``val_loss_rising_epochs`` epochs.  KL growing faster than ``kl_growth_per_epoch`` is only logged
(an early warning, like its alert's ``warning`` severity).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from lever.config.schema import AlertConfig
from lever.obs.trends import KL_KEYS, TrendTracker, as_float, is_grpo

log = logging.getLogger("lever.obs.guard")

ROLLBACK_PREFIX = "rollback: "


@dataclass(frozen=True)
class Finding:
    """One tripped condition.  ``stops`` is False for warning-only conditions."""

    check: str  # kl_max | nonfinite | adv_std_collapse | val_loss_rising | kl_growth
    message: str
    stops: bool = True


def parse_reason(reason: str) -> tuple[bool, str]:
    """Split a guard reason into (rollback requested, message)."""
    if reason.startswith(ROLLBACK_PREFIX):
        return True, reason[len(ROLLBACK_PREFIX):]
    return False, reason


class DivergenceGuard:
    """Callable ``on_epoch_end`` hook; keeps per-phase streaks, so one instance per training stage."""

    def __init__(self, alerts: AlertConfig, logger: Optional[logging.Logger] = None) -> None:
        self.alerts = alerts
        self.mode = alerts.guard
        self.log = logger or log
        self._trackers: dict[str, TrendTracker] = {}
        self.history: list[tuple[str, int, Finding]] = []  # every finding, for reports
        self.stopped: Optional[tuple[str, int, str]] = None  # (phase, epoch, reason) once stopped

    def check(self, phase: str, epoch: int, metrics: Mapping[str, Any]) -> list[Finding]:
        """All conditions tripped by this epoch (updates the streaks; ignores the mode)."""
        a = self.alerts
        tracker = self._trackers.get(phase)
        if tracker is None:
            tracker = self._trackers[phase] = TrendTracker(phase, a.adv_std_floor)
        trend = tracker.update(metrics)
        found: list[Finding] = []
        if trend.nonfinite:
            vals = ", ".join(f"{k}={metrics[k]}" for k in trend.nonfinite)
            found.append(Finding("nonfinite", f"non-finite {vals}"))
        kls = {k: as_float(metrics.get(k)) for k in KL_KEYS}
        over = {k: v for k, v in kls.items() if v is not None and math.isfinite(v) and v > a.kl_max}
        if over:
            vals = ", ".join(f"{k}={v:.4g}" for k, v in over.items())
            found.append(Finding("kl_max", f"KL above {a.kl_max:g}: {vals}"))
        for est, delta in trend.kl_epoch_delta.items():
            if delta > a.kl_growth_per_epoch:
                found.append(Finding("kl_growth", f"kl_{est} grew by {delta:.4g} in one epoch "
                                                  f"(> {a.kl_growth_per_epoch:g})", stops=False))
        if is_grpo(phase) and trend.adv_std_low_epochs >= a.adv_std_epochs:
            found.append(Finding(
                "adv_std_collapse",
                f"advantage std below {a.adv_std_floor:g} for {trend.adv_std_low_epochs} epochs "
                f"(adv_std={as_float(metrics.get('adv_std')):.4g}): nothing is learning",
            ))
        if trend.val_loss_rising_epochs >= a.val_loss_rising_epochs:
            found.append(Finding(
                "val_loss_rising",
                f"val loss rose {trend.val_loss_rising_epochs} epochs in a row "
                f"(threshold {a.val_loss_rising_epochs})",
            ))
        return found

    def __call__(self, phase: str, epoch: int, metrics: Mapping[str, Any]) -> Optional[str]:
        if self.mode == "off":
            return None
        findings = self.check(phase, epoch, metrics)
        for f in findings:
            self.history.append((phase, epoch, f))
            self.log.warning("divergence guard [%s epoch %d] %s: %s", phase, epoch, f.check, f.message)
        stopping = [f for f in findings if f.stops]
        if not stopping or self.mode == "warn":
            return None
        reason = f"divergence guard ({phase} epoch {epoch}): " + "; ".join(f.message for f in stopping)
        if self.mode == "rollback":
            reason = ROLLBACK_PREFIX + reason
        self.stopped = (phase, epoch, reason)
        self.log.error("stopping training: %s", reason)
        return reason


def make_guard(alerts: AlertConfig, logger: Optional[logging.Logger] = None) -> Optional[DivergenceGuard]:
    """A guard for the trainer's hook list, or None when ``alerts.guard == "off"``."""
    return None if alerts.guard == "off" else DivergenceGuard(alerts, logger)
