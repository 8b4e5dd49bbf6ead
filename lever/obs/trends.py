"""Per-epoch trend tracking shared by the exporter and the divergence guard.

Prometheus sees one gauge value per epoch push and evaluates rules on wall-clock time, so
"rising for N consecutive *epochs*" or "KL grew by X *per epoch*" cannot be expressed exactly in
PromQL when epochs take seconds in one plan and hours in another.  The training process knows the
epoch boundaries, so it computes these counters itself and exports them as gauges; the alert rules
only threshold them.  The guard uses the very same class, so the alert and the in-process stop
decision can never disagree about what "rising for 5 epochs" means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

# Metric keys whose non-finite value means the optimisation itself is broken.
LOSS_KEYS: tuple[str, ...] = (
    "train_loss",
    "val_loss",
    "ppo_loss",
    "kl_k3",
    "kl_exact",
    "kl",
    "loss",
    "grad_norm",
)
KL_KEYS: tuple[str, ...] = ("kl_k3", "kl_exact")


def as_float(value: Any) -> Optional[float]:
    """A metric value as float, or None when absent/not numeric (trainers may leave gaps)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def nonfinite_keys(metrics: Mapping[str, Any]) -> list[str]:
    """Loss-like keys whose value is NaN or +-Inf, in LOSS_KEYS order."""
    bad = []
    for key in LOSS_KEYS:
        v = as_float(metrics.get(key))
        if v is not None and not math.isfinite(v):
            bad.append(key)
    return bad


def is_grpo(phase: str) -> bool:
    """GRPO phases are named ``grpo`` (curriculum phases may add a suffix, e.g. ``grpo_p2``)."""
    return phase.lower().startswith("grpo")


@dataclass
class EpochTrend:
    """What one epoch changed, derived from the sequence of epochs seen so far in one phase."""

    val_loss_rising_epochs: int = 0
    epochs_since_best_val_loss: int = 0
    kl_epoch_delta: dict[str, float] = field(default_factory=dict)  # estimator -> kl(e) - kl(e-1)
    adv_std_low_epochs: int = 0
    nonfinite: list[str] = field(default_factory=list)


class TrendTracker:
    """Consecutive-epoch counters for one phase.

    * ``val_loss_rising_epochs``: epochs in a row whose val_loss exceeded the previous epoch's
      (reset by any epoch that does not rise; a missing or non-finite value resets too).
    * ``epochs_since_best_val_loss``: patience-style counter, exported for the dashboard.
    * ``kl_epoch_delta``: per estimator, this epoch's KL minus the previous epoch's.
    * ``adv_std_low_epochs``: epochs in a row with adv_std below ``adv_std_floor`` (0 outside GRPO
      phases, where advantages do not exist).
    """

    def __init__(self, phase: str, adv_std_floor: float) -> None:
        self.phase = phase
        self.adv_std_floor = adv_std_floor
        self._prev_val: Optional[float] = None
        self._best_val: Optional[float] = None
        self._rising = 0
        self._since_best = 0
        self._prev_kl: dict[str, float] = {}
        self._adv_low = 0

    def update(self, metrics: Mapping[str, Any]) -> EpochTrend:
        trend = EpochTrend(nonfinite=nonfinite_keys(metrics))

        val = as_float(metrics.get("val_loss"))
        if val is not None and math.isfinite(val):
            if self._prev_val is not None and val > self._prev_val:
                self._rising += 1
            else:
                self._rising = 0
            if self._best_val is None or val < self._best_val:
                self._best_val = val
                self._since_best = 0
            else:
                self._since_best += 1
            self._prev_val = val
        else:
            self._rising = 0
        trend.val_loss_rising_epochs = self._rising
        trend.epochs_since_best_val_loss = self._since_best

        for key in KL_KEYS:
            kl = as_float(metrics.get(key))
            if kl is None or not math.isfinite(kl):
                continue
            est = key.removeprefix("kl_")
            if est in self._prev_kl:
                trend.kl_epoch_delta[est] = kl - self._prev_kl[est]
            self._prev_kl[est] = kl

        adv = as_float(metrics.get("adv_std"))
        if is_grpo(self.phase) and adv is not None and math.isfinite(adv) and adv < self.adv_std_floor:
            self._adv_low += 1
        else:
            self._adv_low = 0
        trend.adv_std_low_epochs = self._adv_low
        return trend
