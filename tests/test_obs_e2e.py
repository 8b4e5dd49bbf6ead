"""End to end with real servers: a diverging training pushes to a Pushgateway, Prometheus scrapes
it and evaluates the shipped rules, and the KL alert fires in Prometheus's API.

Both servers are Debian's binaries started on free loopback ports with their own temp storage,
and always stopped by the fixture finalizers.  The training is a small GRPO-style loop of our own
(policy over candidates, frozen reference, huge learning rate) so that KL is forced past
``alerts.kl_max``; once helper C's trainer is in, it can drive the same Telemetry instead.
"""

from __future__ import annotations

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
import torch

from lever.config.schema import AlertConfig
from lever.obs.alerts import render
from lever.obs.guard import DivergenceGuard
from lever.obs.telemetry import Telemetry

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


def diverging_training(tel: Telemetry, guard: DivergenceGuard, epochs: int = 8, steps: int = 4) -> Optional[str]:
    """GRPO-style loop over a categorical policy whose best candidate the frozen reference finds
    nearly impossible; with lr 50 the policy jumps onto it and KL(policy || reference) explodes."""
    gen = torch.Generator().manual_seed(0)
    k, group = 32, 16
    ref_logits = torch.randn(k, generator=gen) * 2.0
    best = int(torch.argmin(ref_logits))
    ref_logits[best] = ref_logits.min() - 20.0  # reference puts ~e^-20 on the rewarded candidate
    reward = torch.zeros(k)
    reward[best] = 1.0
    logits = torch.nn.Parameter(ref_logits.clone())
    opt = torch.optim.SGD([logits], lr=50.0)
    ref_logp = torch.log_softmax(ref_logits, -1)
    for epoch in range(1, epochs + 1):
        rows = []
        for step in range(steps):
            logp = torch.log_softmax(logits, -1)
            # explore uniformly so the rare candidate is found; importance-weight the policy term
            idx = torch.randint(0, k, (group,), generator=gen)
            r = reward[idx]
            adv = (r - r.mean()) / r.std().clamp_min(0.1)
            ppo_loss = -(adv * logp[idx]).mean()
            with torch.no_grad():
                pol = logp.exp()
                kl_exact = float((pol * (logp - ref_logp)).sum())
                samp = torch.multinomial(pol, group, replacement=True, generator=gen)
                log_ratio = ref_logp[samp] - logp[samp]
                kl_k3 = float((log_ratio.exp() - 1 - log_ratio).mean())
            opt.zero_grad()
            ppo_loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_([logits], 1e9))
            opt.step()
            tel.step("grpo", (epoch - 1) * steps + step, {"kl": kl_k3, "ppo_loss": ppo_loss.item(),
                                                          "reward": float(r.mean()), "grad_norm": grad_norm})
            rows.append((ppo_loss.item(), kl_k3, kl_exact, float(adv.std()), float(adv.abs().max()),
                         float(r.mean()), float(r.std()), grad_norm))
        mean = [sum(c) / len(c) for c in zip(*rows)]
        metrics = {"train_loss": mean[0], "val_loss": mean[0], "ppo_loss": mean[0], "kl_k3": mean[1],
                   "kl_exact": mean[2], "adv_std": mean[3], "adv_max": mean[4], "beta": 0.0,
                   "reward_mean": mean[5], "reward_std": mean[6], "grad_norm": mean[7],
                   "zero_std_frac": 0.0, "clip_frac": 0.0,
                   "entropy": float(-(logits.softmax(-1) * logits.log_softmax(-1)).sum().detach())}
        metrics["kl_k3"], metrics["kl_exact"] = rows[-1][1], rows[-1][2]  # KL of the epoch's final policy
        tel.epoch("grpo", epoch, metrics)
        reason = guard("grpo", epoch, metrics)
        if reason:
            return reason
    return None


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    _, body = _get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    data = json.loads(body)
    assert data["status"] == "success", data
    return data["data"]["result"]


@needs_servers
def test_kl_alert_fires_from_pushed_training_metrics(prometheus: str, pushgateway: str) -> None:
    alerts = AlertConfig(guard="stop")
    run_id = f"e2e-{int(time.time())}"
    tel = Telemetry("plan-e2e", run_id, "train-grpo", pushgateway, alerts=alerts, push_interval_s=0.0)
    tel.start()
    t0 = time.monotonic()
    reason = diverging_training(tel, DivergenceGuard(alerts))
    tel.stage_done("stopped" if reason else "succeeded", time.monotonic() - t0)
    assert tel.pushes_failed == 0 and tel.pushes_ok >= 3
    assert reason is not None and "KL above" in reason, reason  # the guard stopped the divergence

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
