"""Prometheus telemetry for one stage run (one plan, run id, stage and optional fan-out unit).

Why this shape:

* Each ``Telemetry`` owns its own ``CollectorRegistry``: a push replaces the whole Pushgateway
  group with exactly this stage's series (PUT), and tests can build several side by side.
* Batch pods push (grouping key plan/run_id/stage[/unit]) on every epoch, at stage start and end,
  and at most every ``push_interval_s`` for step/progress updates.  A push that fails logs a
  warning and never raises: losing a metric must never cost a training run.
* Epoch-based trends (val loss rising N epochs, KL growth per epoch, adv std below the floor for
  N epochs) are computed here, where epoch boundaries are known, and exported as gauges that the
  alert rules threshold (see ``lever.obs.trends``).
* Every series carries ``plan``, ``run_id`` and ``stage`` as labels as well as in the grouping
  key, so that a directly scraped /metrics endpoint (``LEVER_METRICS_PORT``) yields the same
  series as the Pushgateway path.

The hooks the pipeline calls (``ctx.telemetry``) are ``epoch``, ``step``, ``progress``,
``accuracy``, ``stage_done`` and ``nonfinite``; ``NullTelemetry`` accepts the same calls.
The nightly gauges (``lever_nightly_*``) are not stage telemetry: ``lever regress`` pushes them
(``lever.report.regression.push_gauges``), with the same grouping conventions.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any, Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.exposition import push_to_gateway

from lever.config.schema import AlertConfig
from lever.obs.server import MetricsServer, serve_metrics, serve_process_metrics
from lever.obs.trends import TrendTracker, as_float, nonfinite_keys

log = logging.getLogger("lever.obs")

# Counters' ``*_created`` samples are one extra series per counter child in every Pushgateway
# group and nobody queries them (a pushed group is a snapshot): off for the process.
disable_created_metrics()

PUSH_JOB = "lever"
ENV_PUSHGATEWAY = "LEVER_PUSHGATEWAY_URL"
ENV_METRICS_PORT = "LEVER_METRICS_PORT"
ENV_METRICS_ADDR = "LEVER_METRICS_ADDR"

BASE_LABELS: tuple[str, ...] = ("plan", "run_id", "stage")

# per-epoch metric key -> (metric name, extra constant labels, help)
EPOCH_GAUGES: dict[str, tuple[str, dict[str, str], str]] = {
    "train_loss": ("lever_train_loss", {}, "Training loss of the epoch (mean over batches)."),
    "val_loss": ("lever_train_val_loss", {}, "Validation loss (RCE loss at tau 1 on held-out queries)."),
    "val_reward": ("lever_train_val_reward", {}, "Expected reward of the greedy sequence on held-out groups."),
    "ppo_loss": ("lever_train_ppo_loss", {}, "Clipped PPO surrogate loss (GRPO)."),
    "kl_k3": ("lever_train_kl", {"estimator": "k3"}, "KL(policy || reference) in nats, by estimator."),
    "kl_exact": ("lever_train_kl", {"estimator": "exact"}, "KL(policy || reference) in nats, by estimator."),
    "adv_std": ("lever_train_advantage_std", {}, "Standard deviation of GRPO advantages."),
    "adv_max": ("lever_train_advantage_max", {}, "Largest absolute GRPO advantage."),
    "beta": ("lever_train_kl_beta", {}, "KL penalty coefficient in use."),
    "reward_mean": ("lever_train_reward_mean", {}, "Mean candidate reward."),
    "reward_std": ("lever_train_reward_std", {}, "Standard deviation of candidate rewards."),
    "zero_std_frac": ("lever_train_zero_std_group_ratio", {}, "Share of query groups whose rewards have zero variance."),
    "clip_frac": ("lever_train_clip_ratio", {}, "Share of PPO ratios that were clipped."),
    "entropy": ("lever_train_entropy_nats", {}, "Mean policy entropy over the candidate distribution."),
    "grad_norm": ("lever_train_grad_norm", {}, "Gradient norm before clipping."),
    # online rollouts (grpo.rollout: online; lever.rl.online)
    "rollout_reward": ("lever_train_rollout_reward", {}, "Mean reward of the groups the selector sampled this epoch."),
    "heldout_reward": ("lever_train_heldout_reward", {}, "Mean reward of the policy's own samples on held-out queries."),
    "judged_new": ("lever_train_judgements", {"source": "new"}, "Sequences judged this epoch, by LVLM vs cache."),
    "judged_cached": ("lever_train_judgements", {"source": "cache"}, "Sequences judged this epoch, by LVLM vs cache."),
    "lvlm_calls": ("lever_train_lvlm_calls", {}, "LVLM forward passes of this epoch's rollouts."),
    "judge_seconds": ("lever_train_seconds", {"part": "judge"}, "Seconds of this epoch, by part."),
    "optimize_seconds": ("lever_train_seconds", {"part": "optimize"}, "Seconds of this epoch, by part."),
}
# per-step metric key -> (metric name, extra constant labels, help)
STEP_GAUGES: dict[str, tuple[str, dict[str, str], str]] = {
    "kl": ("lever_train_step_kl", {"estimator": "k3"}, "KL of the last optimisation step, by estimator."),
    "kl_k3": ("lever_train_step_kl", {"estimator": "k3"}, "KL of the last optimisation step, by estimator."),
    "kl_exact": ("lever_train_step_kl", {"estimator": "exact"}, "KL of the last optimisation step, by estimator."),
    "ppo_loss": ("lever_train_step_ppo_loss", {}, "PPO loss of the last optimisation step."),
    "loss": ("lever_train_step_loss", {}, "Total loss of the last optimisation step."),
    "reward": ("lever_train_step_reward", {}, "Mean reward of the last step's batch."),
    "grad_norm": ("lever_train_step_grad_norm", {}, "Gradient norm of the last step (before clipping)."),
    "clip_frac": ("lever_train_step_clip_ratio", {}, "Share of clipped PPO ratios in the last step."),
}
# keys trainers put in their rows that are not metrics (or are exported elsewhere): ignored quietly
IGNORED_KEYS = frozenset({"epoch", "step", "phase"})


def _sanitize_unit(unit: str) -> str:
    """Grouping-key values go into a URL path; keep them short and plain."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", unit).strip("_") or "unit"


class Telemetry:
    """Metrics of one stage run, pushed to a Pushgateway and/or served on /metrics."""

    def __init__(
        self,
        plan: str,
        run_id: str,
        stage: str,
        pushgateway_url: Optional[str] = None,
        *,
        unit: Optional[str] = None,
        alerts: Optional[AlertConfig] = None,
        push_interval_s: float = 15.0,
        push_timeout_s: float = 3.0,
        retry_after_s: float = 30.0,
    ) -> None:
        self.plan, self.run_id, self.stage = plan, run_id, stage
        self.unit = _sanitize_unit(unit) if unit else None
        self.pushgateway_url = pushgateway_url or None
        self.alerts = alerts or AlertConfig()
        self.push_interval_s = push_interval_s
        self.push_timeout_s = push_timeout_s
        self.retry_after_s = retry_after_s
        self.registry = CollectorRegistry(auto_describe=True)
        self.server: Optional[MetricsServer] = None
        self._shared_server = False
        self.pushes_ok = 0
        self.pushes_failed = 0

        self._label_names = BASE_LABELS + (("unit",) if self.unit else ())
        self._base = {"plan": plan, "run_id": run_id, "stage": stage}
        if self.unit:
            self._base["unit"] = self.unit
        self._lock = threading.Lock()
        self._last_push_attempt = 0.0
        self._failing_since: Optional[float] = None
        self._trackers: dict[str, TrendTracker] = {}
        self._nonfinite_phases: set[str] = set()
        self._lvlm_seen = 0
        self._warned: set[str] = set()
        self._started = time.time()
        self._build_metrics()
        self._g_running.labels(**self._base).set(1)
        self._g_started.labels(**self._base).set(self._started)

    # ------------------------------------------------------------------ metric objects
    def _gauge(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, self._label_names + extra, registry=self.registry)

    def _build_metrics(self) -> None:
        self._epoch_gauges: dict[str, Gauge] = {}
        for name, labels, doc in EPOCH_GAUGES.values():
            if name not in self._epoch_gauges:
                self._epoch_gauges[name] = self._gauge(name, doc, ("phase",) + tuple(labels))
        self._step_gauges: dict[str, Gauge] = {}
        for name, labels, doc in STEP_GAUGES.values():
            if name not in self._step_gauges:
                self._step_gauges[name] = self._gauge(name, doc, ("phase",) + tuple(labels))
        self._g_epoch = self._gauge("lever_train_epoch", "Last finished epoch (1-based).", ("phase",))
        self._g_step = self._gauge("lever_train_step", "Last optimisation step.", ("phase",))
        self._g_rising = self._gauge(
            "lever_train_val_loss_rising_epochs",
            "Consecutive epochs whose val loss exceeded the previous epoch's (computed client-side).",
            ("phase",),
        )
        self._g_since_best = self._gauge(
            "lever_train_epochs_since_best_val_loss", "Epochs since the lowest val loss so far.", ("phase",)
        )
        self._g_kl_delta = self._gauge(
            "lever_train_kl_epoch_delta", "KL of this epoch minus KL of the previous epoch.", ("phase", "estimator")
        )
        self._g_adv_low = self._gauge(
            "lever_train_advantage_std_low_epochs",
            "Consecutive GRPO epochs with advantage std below alerts.adv_std_floor.",
            ("phase",),
        )
        self._g_nonfinite = self._gauge(
            "lever_train_loss_nonfinite", "1 once a loss, KL or grad norm was NaN or Inf in this run.", ("phase",)
        )
        self._g_running = self._gauge("lever_stage_running", "1 while the stage runs, 0 once it ended.")
        self._g_started = self._gauge("lever_stage_start_timestamp_seconds", "Unix time the stage started.")
        self._g_duration = self._gauge("lever_stage_duration_seconds", "Wall time of the finished stage.")
        self._c_runs = Counter(
            "lever_stage_runs", "Finished stage runs by outcome.", self._label_names + ("outcome",), registry=self.registry
        )
        self._g_last_push = self._gauge(
            "lever_last_push_timestamp_seconds", "Unix time of the last report (push, or update when served)."
        )
        self._g_done = self._gauge(
            "lever_stage_items_done", "Work items finished by this unit (RL-data: queries; infer: samples)."
        )
        self._g_total = self._gauge("lever_stage_items_planned", "Work items this unit has to do.")
        self._c_lvlm = Counter("lever_lvlm_calls", "LVLM calls (batched requests) made.", self._label_names, registry=self.registry)
        self._g_acc = self._gauge("lever_infer_accuracy", "VQA accuracy (0..1) per variant and shot.", ("variant", "shot"))

    # ------------------------------------------------------------------ hooks
    def epoch(self, phase: str, epoch: int, metrics: Mapping[str, Any]) -> None:
        """Record one finished epoch and push.  Unknown keys are ignored (logged once)."""
        try:
            with self._lock:
                self._record_epoch(phase, epoch, metrics)
            self.push()
        except Exception as exc:  # never let telemetry break training
            log.warning("telemetry.epoch failed: %s", exc)

    def _record_epoch(self, phase: str, epoch: int, metrics: Mapping[str, Any]) -> None:
        lab = dict(self._base, phase=phase)
        self._g_epoch.labels(**lab).set(epoch)
        for key, value in metrics.items():
            spec = EPOCH_GAUGES.get(key)
            v = as_float(value)
            if spec is None:
                self._note_unknown("epoch", key)
                continue
            if v is None:
                continue
            name, extra, _ = spec
            self._epoch_gauges[name].labels(**lab, **extra).set(v)
        tracker = self._trackers.get(phase)
        if tracker is None:
            tracker = self._trackers[phase] = TrendTracker(phase, self.alerts.adv_std_floor)
        trend = tracker.update(metrics)
        self._g_rising.labels(**lab).set(trend.val_loss_rising_epochs)
        self._g_since_best.labels(**lab).set(trend.epochs_since_best_val_loss)
        self._g_adv_low.labels(**lab).set(trend.adv_std_low_epochs)
        for est, delta in trend.kl_epoch_delta.items():
            self._g_kl_delta.labels(**lab, estimator=est).set(delta)
        self._mark_nonfinite(phase, trend.nonfinite)

    def _mark_nonfinite(self, phase: str, bad: list[str]) -> None:
        g = self._g_nonfinite.labels(**self._base, phase=phase)
        if bad:
            g.set(1)  # sticky: a NaN epoch stays visible after training recovers or stops
            self._nonfinite_phases.add(phase)
            self._warn_once(f"nonfinite:{phase}", "non-finite %s in phase %s", ", ".join(bad), phase)
        elif phase not in self._nonfinite_phases:
            g.set(0)

    def nonfinite(self, phase: str, what: str) -> None:
        """Flag a NaN/Inf the trainer caught itself (it raises before reporting the value), and push
        now: the stage is about to fail, and this is what makes ``LeverNonFiniteLoss`` fire."""
        try:
            with self._lock:
                self._mark_nonfinite(phase, [what])
            self.push(force=True)
        except Exception as exc:
            log.warning("telemetry.nonfinite failed: %s", exc)

    def step(self, phase: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Record the last optimisation step; pushes at most every ``push_interval_s``."""
        try:
            with self._lock:
                lab = dict(self._base, phase=phase)
                self._g_step.labels(**lab).set(step)
                for key, value in metrics.items():
                    spec = STEP_GAUGES.get(key)
                    v = as_float(value)
                    if spec is None:
                        self._note_unknown("step", key)
                    elif v is not None:
                        self._step_gauges[spec[0]].labels(**lab, **spec[1]).set(v)
                self._mark_nonfinite(phase, nonfinite_keys(metrics))
            self._maybe_push()
        except Exception as exc:
            log.warning("telemetry.step failed: %s", exc)

    def progress(self, done: int, total: int, lvlm_calls: int = 0) -> None:
        """Progress of a long loop (RL-data queries, inference samples).  ``lvlm_calls`` is the
        cumulative count for this unit so far.  Throttled push; a stage that may run longer than
        ``alerts.stalled_minutes`` without an epoch must call this (or ``step``) to not look stalled."""
        try:
            with self._lock:
                self._g_done.labels(**self._base).set(done)
                self._g_total.labels(**self._base).set(total)
                calls = int(lvlm_calls or 0)
                if calls > self._lvlm_seen:
                    self._c_lvlm.labels(**self._base).inc(calls - self._lvlm_seen)
                    self._lvlm_seen = calls
                elif calls < self._lvlm_seen:
                    self._warn_once("lvlm", "lvlm_calls went down (%d < %d): it must be cumulative", calls, self._lvlm_seen)
                else:
                    self._c_lvlm.labels(**self._base)  # make the series exist at 0
            if done >= total:
                self.push()
            else:
                self._maybe_push()
        except Exception as exc:
            log.warning("telemetry.progress failed: %s", exc)

    def accuracy(self, variant: str, shot: int, acc: float) -> None:
        """Inference accuracy of one variant at one shot count, as a ratio in 0..1."""
        try:
            v = float(acc)
            if not 0.0 <= v <= 1.0:
                log.warning("accuracy %r for %s/%s-shot is outside 0..1 (pass a ratio, not a percentage)", acc, variant, shot)
            with self._lock:
                self._g_acc.labels(**self._base, variant=str(variant), shot=str(shot)).set(v)
            self.push()
        except Exception as exc:
            log.warning("telemetry.accuracy failed: %s", exc)

    def stage_done(self, outcome: str, seconds: float) -> None:
        """End of the stage (``outcome``: succeeded | failed | stopped | ...); always pushes."""
        try:
            with self._lock:
                self._g_duration.labels(**self._base).set(float(seconds))
                self._c_runs.labels(**self._base, outcome=str(outcome)).inc()
                self._g_running.labels(**self._base).set(0)
            self.push(force=True)
        except Exception as exc:
            log.warning("telemetry.stage_done failed: %s", exc)

    # ------------------------------------------------------------------ transport
    @property
    def grouping_key(self) -> dict[str, str]:
        key = {"plan": self.plan, "run_id": self.run_id, "stage": self.stage}
        if self.unit:
            key["unit"] = self.unit
        return key

    def push(self, force: bool = False) -> bool:
        """Push the registry now (PUT: replaces this group).  Returns whether it succeeded.

        After a failure, pushes are skipped for ``retry_after_s`` (unless ``force``) so that a dead
        gateway costs at most one timeout per interval instead of one per epoch."""
        now = time.time()
        self._g_last_push.labels(**self._base).set(now)
        if not self.pushgateway_url:
            return False
        if not force and self._failing_since is not None and now - self._last_push_attempt < self.retry_after_s:
            return False
        self._last_push_attempt = now
        try:
            push_to_gateway(
                self.pushgateway_url,
                job=PUSH_JOB,
                registry=self.registry,
                grouping_key=self.grouping_key,
                timeout=self.push_timeout_s,
            )
        except Exception as exc:
            self.pushes_failed += 1
            if self._failing_since is None:
                self._failing_since = now
            log.warning("metrics push to %s failed (training goes on): %s", self.pushgateway_url, exc)
            return False
        if self._failing_since is not None:
            log.info("metrics push to %s works again", self.pushgateway_url)
        self._failing_since = None
        self.pushes_ok += 1
        return True

    def _maybe_push(self) -> None:
        """Throttled push for frequent updates; without a gateway only the report time moves."""
        if not self.pushgateway_url or time.time() - self._last_push_attempt >= self.push_interval_s:
            self.push()

    def serve(self, port: int, addr: str = "0.0.0.0", shared: bool = False) -> MetricsServer:
        """Also expose this registry on /metrics (``port=0``: a free port).  ``shared``: use the
        process-wide server for that port (what ``make_telemetry`` does for ``LEVER_METRICS_PORT``),
        so consecutive stages in one process do not fight over the port."""
        if self.server is None:
            self.server = serve_process_metrics(self.registry, port, addr) if shared else serve_metrics(self.registry, port, addr)
            self._shared_server = shared
        return self.server

    def close(self) -> None:
        """Stop an own /metrics server (a shared one stays up for the next stage); pushes need no cleanup."""
        if self.server is not None:
            if not self._shared_server:
                self.server.close()
            self.server = None

    def start(self) -> "Telemetry":
        """Push the 'stage running' state once, so a stage that dies early still shows as stalled."""
        self.push(force=True)
        return self

    def _note_unknown(self, kind: str, key: str) -> None:
        """Trainers pass whole rows (tau, ratio_min, ...): unknown keys are expected, so debug only."""
        if key not in IGNORED_KEYS and f"{kind}:{key}" not in self._warned:
            self._warned.add(f"{kind}:{key}")
            log.debug("telemetry ignores %s metric %r", kind, key)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def __enter__(self) -> "Telemetry":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class NullTelemetry:
    """Metrics are off: every hook is accepted and ignored."""

    registry = None
    server = None

    def epoch(self, phase: str, epoch: int, metrics: Mapping[str, Any]) -> None:
        return None

    def step(self, phase: str, step: int, metrics: Mapping[str, Any]) -> None:
        return None

    def nonfinite(self, phase: str, what: str) -> None:
        return None

    def progress(self, done: int, total: int, lvlm_calls: int = 0) -> None:
        return None

    def accuracy(self, variant: str, shot: int, acc: float) -> None:
        return None

    def stage_done(self, outcome: str, seconds: float) -> None:
        return None

    def push(self, force: bool = False) -> bool:
        return False

    def close(self) -> None:
        return None

    def start(self) -> "NullTelemetry":
        return self

    def __enter__(self) -> "NullTelemetry":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


_said_off = False


def make_telemetry(
    plan: str,
    run_id: str,
    stage: str,
    pushgateway_url: Optional[str] = None,
    *,
    unit: Optional[str] = None,
    alerts: Optional[AlertConfig] = None,
    metrics_port: Optional[int] = None,
) -> Telemetry | NullTelemetry:
    """The runner's factory for ``ctx.telemetry``.

    URL defaults to ``$LEVER_PUSHGATEWAY_URL``, the /metrics port to ``$LEVER_METRICS_PORT``
    (address ``$LEVER_METRICS_ADDR``, default 0.0.0.0).  With neither, metrics are off: a
    ``NullTelemetry`` is returned and the process says so once.  Pass ``unit`` for fanned-out
    stages (shards, variant x shot) so that units do not overwrite each other's Pushgateway group,
    and ``alerts`` (the plan's ``AlertConfig``) so client-side trend counters use the plan's floor.
    """
    global _said_off
    url = pushgateway_url or os.environ.get(ENV_PUSHGATEWAY) or None
    port_env = os.environ.get(ENV_METRICS_PORT, "").strip()
    port = metrics_port if metrics_port is not None else (int(port_env) if port_env else None)
    if not url and port is None:
        if not _said_off:
            _said_off = True
            log.info("metrics are off (set %s or %s to turn them on)", ENV_PUSHGATEWAY, ENV_METRICS_PORT)
        return NullTelemetry()
    tel = Telemetry(plan, run_id, stage, url, unit=unit, alerts=alerts)
    if port is not None:
        try:
            tel.serve(port, os.environ.get(ENV_METRICS_ADDR, "0.0.0.0"), shared=True)
        except OSError as exc:
            log.warning("cannot serve metrics on port %s: %s", port, exc)
    return tel.start()


def emit_all(tel: Telemetry) -> None:
    """Emit one of every kind of sample (used to list what the exporter really exports)."""
    epoch = {k: 0.5 for k in EPOCH_GAUGES}
    tel.epoch("grpo", 1, epoch)
    tel.epoch("grpo", 2, dict(epoch, val_loss=0.6, kl_k3=0.7, kl_exact=0.7))
    tel.step("grpo", 1, {k: 0.1 for k in STEP_GAUGES})
    tel.progress(1, 2, lvlm_calls=3)
    tel.accuracy("v3", 1, 0.5)
    tel.stage_done("succeeded", 1.0)


def exported_metric_names() -> frozenset[str]:
    """Metric names (as Prometheus sees them, incl. ``_total``/``_created``) a Telemetry exports."""
    tel = Telemetry("p", "r", "s", None)
    emit_all(tel)
    names = set()
    for family in tel.registry.collect():
        for sample in family.samples:
            names.add(sample.name)
    return frozenset(names)


EXPORTED_METRICS: frozenset[str] = exported_metric_names()
