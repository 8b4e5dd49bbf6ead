"""End to end with real servers: a diverging training pushes to a Pushgateway, Prometheus scrapes
it and evaluates the shipped rules, and the KL alert fires in Prometheus's API.

Both servers are Debian's binaries started on free loopback ports with their own temp storage,
and always stopped by the fixture finalizers.  The training is the project's own GRPO loop
(``lever.rl.grpo.run_grpo`` with its ``EpochRecorder`` feeding telemetry and the guard hook) on
synthetic groups with a huge learning rate, so that KL is forced past ``alerts.kl_max``.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
from rich.console import Console

from lever.config.schema import AlertConfig, GRPOConfig, RewardConfig, SelectorConfig
from lever.obs.alerts import render
from lever.obs.guard import DivergenceGuard
from lever.obs.telemetry import Telemetry
from lever.rl.groups import build_groups
from lever.rl.grpo import frozen_copy, run_grpo
from rl_synthetic import make_rl_records, synthetic_embeddings
from lever.rl.trainer import EpochRecorder
from lever.rl.validation import split_records
from lever.selectors.pointer import build_selector

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")
PUSHGATEWAY = shutil.which("prometheus-pushgateway")
needs_servers = pytest.mark.skipif(
    PROMETHEUS is None or PUSHGATEWAY is None,
    reason="needs Debian's prometheus and prometheus-pushgateway (apt-get install prometheus prometheus-pushgateway)",
)
DEADLINE_S = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback only)
        return resp.status, resp.read()


def _poll(what: str, fn: Callable[[], Any], deadline_s: float = DEADLINE_S, proc: Optional[subprocess.Popen] = None,
          log: Optional[Path] = None) -> Any:
    """Call ``fn`` every 0.25 s until it returns something truthy; fail after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    last_exc: Optional[BaseException] = None
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{log.read_text() if log else ''}")
        try:
            result = fn()
            if result:
                return result
        except Exception as exc:  # server not up yet
            last_exc = exc
        time.sleep(0.25)
    pytest.fail(f"timed out after {deadline_s}s waiting for {what} (last error: {last_exc})"
                + (f"\n{log.read_text()[-3000:]}" if log and log.exists() else ""))


def _start(cmd: list[str], log: Path, ready_url: str, name: str) -> subprocess.Popen:
    fh = log.open("wb")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    fh.close()
    try:
        _poll(f"{name} ready", lambda: _get(ready_url)[0] == 200, proc=proc, log=log)
    except BaseException:
        _stop(proc)
        raise
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    proc = _start(
        [PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"],
        tmp_path / "pushgateway.log", f"http://127.0.0.1:{port}/-/ready", "pushgateway",
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


@pytest.fixture
def prometheus(tmp_path: Path, pushgateway: str) -> Iterator[str]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(render(AlertConfig(for_minutes=0)), encoding="utf-8")  # fire on first evaluation
    cfg = tmp_path / "prometheus.yml"
    target = pushgateway.removeprefix("http://")
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {rules}\n"
        "scrape_configs:\n  - job_name: pushgateway\n    honor_labels: true\n"
        f"    static_configs:\n      - targets: ['{target}']\n",
        encoding="utf-8",
    )
    port = _free_port()
    proc = _start(
        [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        tmp_path / "prometheus.log", f"http://127.0.0.1:{port}/-/ready", "prometheus",
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def diverging_grpo(tel: Telemetry, guard: DivergenceGuard, out: Path) -> EpochRecorder:
    """The project's GRPO loop on synthetic groups with a huge learning rate (0.5, no KL penalty):
    the policy leaves the frozen reference in the first epoch and KL explodes."""
    n_items, dim = 160, 16
    emb, u = synthetic_embeddings(n_items, dim, 0)
    train_recs, val_recs = split_records(make_rl_records(emb, u, query_ids=list(range(64)), group_sizes=(4, 8), seed=1), 0.25)
    rc = RewardConfig()
    train = build_groups(train_recs, n_items=n_items, reward_cfg=rc)
    val = build_groups(val_recs, n_items=n_items, reward_cfg=rc)
    model = build_selector(dim, SelectorConfig(hidden=32, dropout=0.0), seed=0)
    cfg = GRPOConfig(lr=0.5, batch_size=16, kl_beta=0.0, rank_advantage=False, freeze_backbone=False)
    rec = EpochRecorder(out, telemetry=tel, on_epoch_end=[guard], console=Console(file=io.StringIO()))
    run_grpo(model, emb, train, val, cfg, epochs=5, reference=frozen_copy(model), recorder=rec)
    return rec


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    _, body = _get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    data = json.loads(body)
    assert data["status"] == "success", data
    return data["data"]["result"]


@needs_servers
def test_kl_alert_fires_from_pushed_training_metrics(prometheus: str, pushgateway: str, tmp_path: Path) -> None:
    alerts = AlertConfig(guard="stop")
    run_id = f"e2e-{int(time.time())}"
    tel = Telemetry("plan-e2e", run_id, "train-grpo", pushgateway, alerts=alerts, push_interval_s=0.0)
    tel.start()
    t0 = time.monotonic()
    rec = diverging_grpo(tel, DivergenceGuard(alerts), tmp_path / "out")
    tel.stage_done("stopped" if rec.stopped else "succeeded", time.monotonic() - t0)
    assert tel.pushes_failed == 0 and tel.pushes_ok >= 3
    # the guard stopped the divergence and the trainer recorded why
    assert rec.stopped is not None and "KL above" in rec.stopped["reason"], rec.stopped
    assert json.loads((tmp_path / "out" / "stopped.json").read_text())["reason"] == rec.stopped["reason"]

    # Prometheus scraped the pushed series (honor_labels keeps plan/run_id/stage)
    sel = f'{{plan="plan-e2e",run_id="{run_id}",stage="train-grpo"}}'
    kl = _poll("pushed KL series in Prometheus", lambda: _query(prometheus, f"lever_train_kl{sel}"))
    by_est = {r["metric"]["estimator"]: float(r["value"][1]) for r in kl}
    assert set(by_est) == {"k3", "exact"}
    assert max(by_est.values()) > alerts.kl_max
    assert math.isfinite(by_est["exact"])
    epochs = _query(prometheus, f"lever_train_epoch{sel}")
    assert epochs and float(epochs[0]["value"][1]) >= 1
    assert _query(prometheus, f'lever_stage_runs_total{{run_id="{run_id}",outcome="stopped"}}')

    def kl_alert_firing() -> list[dict[str, Any]]:
        _, body = _get(f"{prometheus}/api/v1/alerts")
        return [a for a in json.loads(body)["data"]["alerts"]
                if a["labels"].get("alertname") == "LeverKLAboveThreshold"
                and a["labels"].get("run_id") == run_id and a["state"] == "firing"]

    firing = _poll("LeverKLAboveThreshold firing", kl_alert_firing)
    assert firing[0]["labels"]["severity"] == "critical"
    assert firing[0]["labels"]["plan"] == "plan-e2e"


@needs_servers
def test_fanned_out_units_keep_separate_groups(pushgateway: str) -> None:
    """Two inference units of one stage push to one gateway; neither overwrites the other."""
    for shot, acc in ((1, 0.5015), (2, 0.4833)):
        tel = Telemetry("plan-e2e", "units", "infer", pushgateway, unit=f"variant=v3,shot={shot},shard=0")
        tel.accuracy("v3", shot, acc)
        tel.stage_done("succeeded", 1.0)
        assert tel.pushes_failed == 0
    _, body = _get(f"{pushgateway}/metrics")
    lines = [ln for ln in body.decode().splitlines() if ln.startswith("lever_infer_accuracy{")]
    shots = {ln.split('shot="')[1].split('"')[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines if 'run_id="units"' in ln}
    assert shots == {"1": 0.5015, "2": 0.4833}


@needs_servers
def test_dashboard_queries_are_valid_promql(prometheus: str) -> None:
    """Every panel query, with the template variables filled in, is accepted by a real Prometheus."""
    from lever.obs.dashboard import build_dashboard

    dash = build_dashboard()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        concrete = expr.replace("$plan", ".*").replace("$run_id", ".*")
        _query(prometheus, concrete)  # asserts status == success (a parse error is HTTP 400)
