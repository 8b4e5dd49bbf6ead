"""DivergenceGuard on metric sequences shaped like the seeds' runs."""

from __future__ import annotations

import logging
from typing import Any, Optional

import pytest

from lever.config.schema import AlertConfig
from lever.obs.guard import ROLLBACK_PREFIX, DivergenceGuard, make_guard, parse_reason
from lever.obs.telemetry import Telemetry


def run(guard: DivergenceGuard, seq: list[dict[str, Any]], phase: str = "grpo") -> tuple[Optional[int], Optional[str]]:
    """Feed epochs until the guard returns a reason; (epoch, reason) or (None, None)."""
    for epoch, metrics in enumerate(seq, start=1):
        reason = guard(phase, epoch, metrics)
        if reason is not None:
            return epoch, reason
    return None, None


def stop(**kw: Any) -> DivergenceGuard:
    return DivergenceGuard(AlertConfig(guard="stop", **kw))


def test_kl_jump_to_17_stops() -> None:
    seq = [{"kl_k3": 0.09, "kl_exact": 0.08}, {"kl_k3": 0.8, "kl_exact": 0.7}, {"kl_k3": 17.0, "kl_exact": 12.0}]
    epoch, reason = run(stop(), seq)
    assert epoch == 3 and "KL above 5" in reason and "kl_k3=17" in reason
    assert not reason.startswith(ROLLBACK_PREFIX)


def test_kl_growth_alone_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lever.obs.guard"):
        epoch, _ = run(stop(), [{"kl_k3": 0.1}, {"kl_k3": 2.5}, {"kl_k3": 4.9}])
    assert epoch is None
    assert any("kl_growth" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("key", ["train_loss", "val_loss", "ppo_loss", "kl_exact", "grad_norm"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_stops(key: str, bad: float) -> None:
    epoch, reason = run(stop(), [{"train_loss": 1.0}, {"train_loss": 0.9, key: bad}], phase="rce")
    assert epoch == 2 and "non-finite" in reason and key in reason


def test_adv_std_collapse_needs_n_grpo_epochs() -> None:
    seeds = [{"adv_std": 0.0063}, {"adv_std": 0.0062}, {"adv_std": 0.0062}, {"adv_std": 0.0062}]
    epoch, reason = run(stop(adv_std_epochs=3), seeds)
    assert epoch == 3 and "nothing is learning" in reason
    # a healthy epoch in between resets the streak
    assert run(stop(adv_std_epochs=3), [{"adv_std": 0.006}, {"adv_std": 0.006}, {"adv_std": 0.6}, {"adv_std": 0.006}]) == (None, None)
    # RCE has no advantages: never a collapse there
    assert run(stop(adv_std_epochs=3), seeds, phase="rce") == (None, None)


def test_val_loss_rising_for_n_epochs() -> None:
    # seeds: best at epoch 2 (5.13576 -> ...), then creeping up
    vals = [5.2, 5.13576, 5.14132, 5.14217, 5.145, 5.15, 5.151, 5.2]
    epoch, reason = run(stop(val_loss_rising_epochs=5), [{"val_loss": v} for v in vals])
    assert epoch == 7 and "rose 5 epochs in a row" in reason
    noisy = [5.2, 5.1, 5.15, 5.16, 5.12, 5.17, 5.18, 5.19, 5.2]  # dips reset the streak
    assert run(stop(val_loss_rising_epochs=5), [{"val_loss": v} for v in noisy]) == (None, None)


def test_modes() -> None:
    seq = [{"kl_k3": 17.0}]
    assert run(DivergenceGuard(AlertConfig(guard="warn")), seq) == (None, None)
    off = DivergenceGuard(AlertConfig(guard="off"))
    assert run(off, [{"train_loss": float("nan")}]) == (None, None) and off.history == []
    assert make_guard(AlertConfig(guard="off")) is None
    rb = DivergenceGuard(AlertConfig(guard="rollback"))
    epoch, reason = run(rb, seq)
    assert epoch == 1 and reason.startswith(ROLLBACK_PREFIX)
    rollback, msg = parse_reason(reason)
    assert rollback and msg.startswith("divergence guard (grpo epoch 1)")
    assert parse_reason("divergence guard (x): y") == (False, "divergence guard (x): y")
    assert rb.stopped == ("grpo", 1, reason)


def test_warn_mode_logs_every_finding(caplog: pytest.LogCaptureFixture) -> None:
    g = DivergenceGuard(AlertConfig(guard="warn"))
    with caplog.at_level(logging.WARNING, logger="lever.obs.guard"):
        run(g, [{"kl_k3": 6.0}, {"kl_k3": 7.0, "train_loss": float("nan")}])
    checks = [f.check for _, _, f in g.history]
    assert checks.count("kl_max") == 2 and "nonfinite" in checks
    assert sum("divergence guard" in r.getMessage() for r in caplog.records) == len(g.history)


def test_phases_keep_separate_streaks() -> None:
    g = stop(val_loss_rising_epochs=2)
    assert g("grpo_p1", 1, {"val_loss": 1.0}) is None
    assert g("grpo_p1", 2, {"val_loss": 1.1}) is None
    assert g("grpo_p2", 1, {"val_loss": 1.2}) is None  # new phase: no previous epoch
    assert g("grpo_p1", 3, {"val_loss": 1.3}) is not None


def test_guard_and_exported_streaks_agree() -> None:
    """The alert thresholds the exported gauge; the guard must trip on exactly the same epoch."""
    alerts = AlertConfig(guard="stop", val_loss_rising_epochs=3, adv_std_epochs=2)
    tel = Telemetry("p", "r", "train-grpo", None, alerts=alerts)
    guard = DivergenceGuard(alerts)
    seq = [(5.0, 0.5), (5.1, 0.005), (5.05, 0.004), (5.2, 0.3), (5.3, 0.2), (5.4, 0.1)]
    for epoch, (v, a) in enumerate(seq, start=1):
        metrics = {"val_loss": v, "adv_std": a}
        tel.epoch("grpo", epoch, metrics)
        found = {f.check for f in guard.check("grpo", epoch, metrics)}
        lab = {"plan": "p", "run_id": "r", "stage": "train-grpo", "phase": "grpo"}
        rising = tel.registry.get_sample_value("lever_train_val_loss_rising_epochs", lab)
        low = tel.registry.get_sample_value("lever_train_advantage_std_low_epochs", lab)
        assert ("val_loss_rising" in found) == (rising >= alerts.val_loss_rising_epochs)
        assert ("adv_std_collapse" in found) == (low >= alerts.adv_std_epochs)
