"""Telemetry: what each hook records, how it pushes, and that a broken gateway never hurts training."""

from __future__ import annotations

import logging
import math
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Iterator

import pytest

from lever.config.schema import AlertConfig
from lever.obs import telemetry as telemetry_mod
from lever.obs.telemetry import EXPORTED_METRICS, NullTelemetry, Telemetry, make_telemetry

BASE = {"plan": "plan5", "run_id": "r1", "stage": "train-grpo"}


def value(tel: Telemetry, name: str, **labels: str) -> float | None:
    return tel.registry.get_sample_value(name, {**BASE, **labels})


@pytest.fixture
def tel() -> Telemetry:
    return Telemetry("plan5", "r1", "train-grpo", None)


def test_epoch_metrics_become_labelled_gauges(tel: Telemetry) -> None:
    tel.epoch("grpo", 3, {"train_loss": 1.5, "val_loss": 5.14, "kl_k3": 0.07, "kl_exact": 0.08, "adv_std": 0.0062,
                          "zero_std_frac": 0.25, "beta": 0.1, "clip_frac": 0.01, "entropy": 2.0, "grad_norm": 0.3})
    assert value(tel, "lever_train_epoch", phase="grpo") == 3
    assert value(tel, "lever_train_loss", phase="grpo") == 1.5
    assert value(tel, "lever_train_val_loss", phase="grpo") == 5.14
    assert value(tel, "lever_train_kl", phase="grpo", estimator="k3") == 0.07
    assert value(tel, "lever_train_kl", phase="grpo", estimator="exact") == 0.08
    assert value(tel, "lever_train_advantage_std", phase="grpo") == 0.0062
    assert value(tel, "lever_train_zero_std_group_ratio", phase="grpo") == 0.25
    assert value(tel, "lever_train_kl_beta", phase="grpo") == 0.1
    assert value(tel, "lever_train_loss_nonfinite", phase="grpo") == 0
    assert value(tel, "lever_stage_running") == 1
    assert value(tel, "lever_last_push_timestamp_seconds") is not None


def test_unknown_and_missing_keys_are_ignored(tel: Telemetry, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="lever.obs"):
        tel.epoch("rce", 1, {"epoch": 1, "train_loss": 2.0, "ppo_loss": None, "mystery": 1.0})
        tel.epoch("rce", 2, {"epoch": 2, "train_loss": 1.0, "mystery": 2.0})
        tel.step("rce", 3, {"epoch": 2, "tau": 1.5, "loss": 0.5})
    assert value(tel, "lever_train_loss", phase="rce") == 1.0
    assert value(tel, "lever_train_step_loss", phase="rce") == 0.5
    assert value(tel, "lever_train_ppo_loss", phase="rce") is None  # RCE has no PPO loss: no series
    assert sum("mystery" in r.getMessage() for r in caplog.records) == 1  # said once, at debug level
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_epoch_trends_are_counted_client_side() -> None:
    tel = Telemetry("plan5", "r1", "train-grpo", None, alerts=AlertConfig(adv_std_floor=0.01))
    vals = [5.13576, 5.14132, 5.14217, 5.15, 5.10, 5.2]
    kls = [0.1, 0.2, 3.0, 17.0, 17.5, 1.0]
    advs = [0.0063, 0.0062, 0.0062, 0.5, 0.006, 0.006]
    seen = []
    for e, (v, k, a) in enumerate(zip(vals, kls, advs), start=1):
        tel.epoch("grpo", e, {"val_loss": v, "kl_k3": k, "adv_std": a})
        seen.append((value(tel, "lever_train_val_loss_rising_epochs", phase="grpo"),
                     value(tel, "lever_train_advantage_std_low_epochs", phase="grpo"),
                     value(tel, "lever_train_kl_epoch_delta", phase="grpo", estimator="k3")))
    assert [s[0] for s in seen] == [0, 1, 2, 3, 0, 1]
    assert [s[1] for s in seen] == [1, 2, 3, 0, 1, 2]
    assert seen[0][2] is None and seen[3][2] == pytest.approx(14.0) and seen[5][2] == pytest.approx(-16.5)
    assert value(tel, "lever_train_epochs_since_best_val_loss", phase="grpo") == 1
    # outside GRPO there are no advantages, so no collapse streak
    tel.epoch("rce", 1, {"adv_std": 0.001})
    assert value(tel, "lever_train_advantage_std_low_epochs", phase="rce") == 0


def test_nonfinite_flag_is_sticky_and_set_from_steps(tel: Telemetry) -> None:
    tel.step("grpo", 1, {"kl_k3": 0.1, "kl_exact": 0.2, "ppo_loss": 0.2, "reward": 1.0, "grad_norm": 0.5})
    assert value(tel, "lever_train_loss_nonfinite", phase="grpo") == 0
    assert value(tel, "lever_train_step", phase="grpo") == 1
    assert value(tel, "lever_train_step_kl", phase="grpo", estimator="k3") == 0.1
    assert value(tel, "lever_train_step_kl", phase="grpo", estimator="exact") == 0.2
    tel.step("grpo", 2, {"ppo_loss": float("nan")})
    assert value(tel, "lever_train_loss_nonfinite", phase="grpo") == 1
    tel.epoch("grpo", 1, {"train_loss": 0.3})  # recovered numbers do not clear it
    assert value(tel, "lever_train_loss_nonfinite", phase="grpo") == 1
    tel.epoch("rce", 1, {"val_loss": float("inf")})
    assert value(tel, "lever_train_loss_nonfinite", phase="rce") == 1
    assert math.isinf(value(tel, "lever_train_val_loss", phase="rce"))
    tel.nonfinite("v2", "loss")  # the trainer caught it before reporting the value
    assert value(tel, "lever_train_loss_nonfinite", phase="v2") == 1


def test_progress_accuracy_and_stage_done(tel: Telemetry) -> None:
    tel.progress(1, 10, lvlm_calls=4)
    tel.progress(5, 10, lvlm_calls=20)
    tel.progress(6, 10, lvlm_calls=7)  # went down: not cumulative -> ignored, counter never decreases
    assert value(tel, "lever_stage_items_done") == 6
    assert value(tel, "lever_stage_items_planned") == 10
    assert value(tel, "lever_lvlm_calls_total") == 20
    tel.accuracy("v3", 2, 0.4833)
    assert value(tel, "lever_infer_accuracy", variant="v3", shot="2") == 0.4833
    # the nightly verdict is `lever regress`'s alone (lever.report.regression.push_gauges)
    assert not hasattr(tel, "nightly")
    assert not any(f.name.startswith("lever_nightly_") for f in tel.registry.collect())
    tel.stage_done("succeeded", 12.5)
    assert value(tel, "lever_stage_running") == 0
    assert value(tel, "lever_stage_duration_seconds") == 12.5
    assert value(tel, "lever_stage_runs_total", outcome="succeeded") == 1


def test_exported_metrics_follow_conventions() -> None:
    assert "lever_train_kl" in EXPORTED_METRICS and "lever_stage_runs_total" in EXPORTED_METRICS
    for name in EXPORTED_METRICS:
        assert name.startswith("lever_") and name == name.lower(), name
    counters = {n for n in EXPORTED_METRICS if n.endswith("_total")}
    assert counters == {"lever_stage_runs_total", "lever_lvlm_calls_total"}


class _Capture(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, bytes]] = []

    def do_PUT(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).requests.append(("PUT", self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def capture_gateway() -> Iterator[tuple[str, list]]:
    _Capture.requests = []
    server = HTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", _Capture.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_push_uses_grouping_key_and_unit(capture_gateway: tuple[str, list]) -> None:
    url, reqs = capture_gateway
    tel = Telemetry("plan5", "r1", "infer", url, unit="variant=v3/shot=2 shard=0")
    tel.start()
    tel.accuracy("v3", 2, 0.5)
    tel.stage_done("succeeded", 3.0)
    assert tel.pushes_ok == 3 and tel.pushes_failed == 0
    method, path, body = reqs[-1]
    assert method == "PUT"
    assert path == "/metrics/job/lever/plan/plan5/run_id/r1/stage/infer/unit/variant_v3_shot_2_shard_0"
    text = body.decode()
    assert 'lever_infer_accuracy{plan="plan5",run_id="r1",shot="2",stage="infer",unit="variant_v3_shot_2_shard_0",variant="v3"} 0.5' in text
    assert "lever_stage_running{" in text and "lever_last_push_timestamp_seconds{" in text


def test_steps_push_throttled(capture_gateway: tuple[str, list]) -> None:
    url, reqs = capture_gateway
    tel = Telemetry("plan5", "r1", "train-grpo", url, push_interval_s=3600)
    for s in range(50):
        tel.step("grpo", s, {"kl": 0.1})
    assert len(reqs) == 1  # first step pushes, the rest wait for the interval
    tel.epoch("grpo", 1, {"kl_k3": 0.1})
    assert len(reqs) == 2  # epochs always push


def test_dead_gateway_never_fails_training(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tel = Telemetry("plan5", "r1", "train-grpo", f"http://127.0.0.1:{port}", push_timeout_s=0.5, retry_after_s=60)
    with caplog.at_level(logging.WARNING, logger="lever.obs"):
        tel.epoch("grpo", 1, {"kl_k3": 0.1})
        tel.epoch("grpo", 2, {"kl_k3": 0.2})  # inside the retry window: skipped, no second timeout
        assert tel.push(force=True) is False  # the end-of-stage push always tries
    assert tel.pushes_failed == 2
    assert any("push" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)
    assert value(tel, "lever_train_kl", phase="grpo", estimator="k3") == 0.2


def test_serve_metrics_endpoint() -> None:
    with Telemetry("plan5", "r1", "train-grpo", None) as tel:
        server = tel.serve(0, "127.0.0.1")
        tel.epoch("grpo", 1, {"kl_k3": 3.25})
        with urllib.request.urlopen(server.url, timeout=5) as resp:  # noqa: S310 (loopback)
            text = resp.read().decode()
        assert 'lever_train_kl{estimator="k3",phase="grpo",plan="plan5",run_id="r1",stage="train-grpo"} 3.25' in text
    assert tel.server is None


def test_make_telemetry_off_says_so_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("LEVER_PUSHGATEWAY_URL", raising=False)
    monkeypatch.delenv("LEVER_METRICS_PORT", raising=False)
    monkeypatch.setattr(telemetry_mod, "_said_off", False)
    with caplog.at_level(logging.INFO, logger="lever.obs"):
        a = make_telemetry("plan5", "r1", "train-grpo")
        b = make_telemetry("plan5", "r1", "infer")
    assert isinstance(a, NullTelemetry) and isinstance(b, NullTelemetry)
    assert sum("metrics are off" in r.getMessage() for r in caplog.records) == 1
    a.epoch("grpo", 1, {"kl_k3": 1.0})
    a.step("grpo", 1, {})
    a.progress(1, 2, lvlm_calls=3)
    a.accuracy("v3", 1, 0.5)
    a.stage_done("succeeded", 1.0)
    assert not hasattr(a, "nightly")


def test_make_telemetry_from_env(monkeypatch: pytest.MonkeyPatch, capture_gateway: tuple[str, list]) -> None:
    url, reqs = capture_gateway
    monkeypatch.setenv("LEVER_PUSHGATEWAY_URL", url)
    monkeypatch.delenv("LEVER_METRICS_PORT", raising=False)
    tel = make_telemetry("plan5", "r1", "train-grpo", alerts=AlertConfig())
    assert isinstance(tel, Telemetry) and tel.pushgateway_url == url
    assert len(reqs) == 1  # announced itself as running

def test_env_port_is_one_server_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Consecutive stages in one process (local runner) share LEVER_METRICS_PORT; the newest wins."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("LEVER_PUSHGATEWAY_URL", raising=False)
    monkeypatch.setenv("LEVER_METRICS_PORT", str(port))
    monkeypatch.setenv("LEVER_METRICS_ADDR", "127.0.0.1")
    first = make_telemetry("plan5", "r1", "train-rce")
    first.epoch("rce", 1, {"train_loss": 1.0})
    first.close()
    second = make_telemetry("plan5", "r1", "train-grpo")
    second.epoch("grpo", 1, {"kl_k3": 0.5})
    assert second.server is not None and second.server.port == port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    assert 'stage="train-grpo"' in text and 'stage="train-rce"' not in text
    second.close()
    from lever.obs import server as server_mod

    for srv, _ in server_mod._process_servers.values():  # this test's process server: stop it
        if srv.port == port:
            srv.close()
