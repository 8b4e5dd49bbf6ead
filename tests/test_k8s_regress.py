"""``lever regress``: the nightly verdict from report.json confidence intervals, and its gauges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lever.platform.regress import ReportFormatError, judge, push_gauges

ROOT = Path(__file__).resolve().parents[1]


def report(**shots) -> dict:
    """shots: name -> (plan, baseline, ci_low, ci_high) in points."""
    return {"shots": {k.lstrip("s"): {"plan": p, "baseline": b, "diff": p - b, "ci_low": lo, "ci_high": hi}
                      for k, (p, b, lo, hi) in shots.items()}}


def test_strict_rule_needs_the_whole_interval_past_the_margin():
    r = report(s1=(50.0, 56.0, -8.5, -3.5), s2=(50.0, 52.0, -4.5, 0.5), s3=(50.0, 51.6, -3.0, -0.2),
               s4=(53.0, 50.0, 0.5, 5.5))
    v = judge(r, plan="plan5", baseline="baseline", margin=1.5)
    flags = {s.shot: s.regression for s in v.shots}
    # shot 1: hi=-3.5 < -1.5 -> regression; 2: CI reaches +0.5; 3: significant drop but hi=-0.2 > -1.5
    assert flags == {"1": True, "2": False, "3": False, "4": False}
    assert v.regression
    assert "REGRESSION" in v.table() and "1" in v.table()


def test_boundary_is_strict_inequality():
    v = judge(report(s1=(50.0, 53.0, -4.0, -1.5)), plan="p", baseline="b", margin=1.5)
    assert not v.regression  # hi == -margin is not *more than* the margin behind


def test_significant_rule_is_more_sensitive():
    r = report(s1=(50.0, 52.0, -3.9, -0.1))
    assert not judge(r, plan="p", baseline="b", margin=1.5).regression
    assert judge(r, plan="p", baseline="b", margin=1.5, rule="significant").regression
    r2 = report(s1=(50.0, 51.0, -1.9, -0.1))  # significant but within the margin
    assert not judge(r2, plan="p", baseline="b", margin=1.5, rule="significant").regression


def test_ratios_are_converted_to_points():
    r = {"shots": {"1": {"plan": 0.50, "baseline": 0.56, "ci_low": -0.085, "ci_high": -0.035}}}
    (s,) = judge(r, plan="p", baseline="b", margin=1.5).shots
    assert s.regression and s.diff == pytest.approx(-6.0) and s.ci_high == pytest.approx(-3.5)
    pct = {"accuracy_unit": "percent", "shots": {"1": {"plan": 0.5, "baseline": 0.9, "ci_high": 0.1}}}
    assert not judge(pct, plan="p", baseline="b", margin=1.5).regression  # 0.4 points down at most


def test_missing_ci_falls_back_to_point_estimate_with_a_note():
    r = {"shots": {"2": {"plan": 40.0, "baseline": 42.0}}}
    v = judge(r, plan="p", baseline="b", margin=1.5)
    assert v.regression and v.shots[0].diff == pytest.approx(-2.0) and v.notes


@pytest.mark.parametrize("bad", [
    {}, {"shots": {}}, {"shots": {"1": {"plan": 0.5}}}, {"shots": {"1": {"plan": "x", "baseline": 0.5}}},
    {"shots": {"1": {"plan": float("nan"), "baseline": 0.5}}}, {"shots": [1, 2]},
    {"baseline_plan": "plan1", "shots": {"1": {"plan": 0.5, "baseline": 0.5}}},
])
def test_malformed_reports_are_user_errors(bad):
    with pytest.raises(ReportFormatError):
        judge(bad, plan="p", baseline="baseline", margin=1.5)


class _Gateway(BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def do_PUT(self):  # noqa: N802 (http.server API)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Gateway.received.append(("PUT", self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):  # keep pytest output clean
        pass


@pytest.fixture()
def gateway():
    _Gateway.received = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _Gateway.received
    srv.shutdown()
    srv.server_close()


def test_gauges_pushed_per_shot(gateway):
    url, received = gateway
    v = judge(report(s1=(50.0, 56.0, -8.5, -3.5), s2=(55.0, 54.0, -1.0, 3.0)), plan="plan5", baseline="baseline", margin=1.5)
    push_gauges(v, url, run_id="lever-nightly-abc")
    (method, path, body) = received[0]
    assert path == "/metrics/job/lever/plan/plan5/run_id/lever-nightly-abc/stage/regress"
    text = body.decode()
    assert 'lever_nightly_regression{plan="plan5",run_id="lever-nightly-abc",shot="1",stage="regress"} 1.0' in text
    assert 'lever_nightly_regression{plan="plan5",run_id="lever-nightly-abc",shot="2",stage="regress"} 0.0' in text
    assert 'lever_nightly_accuracy_delta{plan="plan5",run_id="lever-nightly-abc",shot="1",stage="regress"} -0.06' in text
    assert "lever_last_push_timestamp_seconds{" in text


def _lever(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "LEVER_PUSHGATEWAY_URL": ""}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "lever", *args], capture_output=True, text=True, cwd=ROOT,
                          env=e, timeout=120)


def test_cli_exit_codes(tmp_path, gateway):
    url, received = gateway
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(report(s1=(50.0, 56.0, -8.5, -3.5))))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(report(s1=(56.0, 55.0, -1.0, 3.0))))
    r = _lever("regress", "--plan", "plan5", "--baseline", "baseline", "--report", str(bad),
               "--pushgateway", url, "--run-id", "r1")
    assert r.returncode == 1 and "REGRESSION" in r.stdout
    assert received and b'shot="1",stage="regress"} 1.0' in received[-1][2]
    assert _lever("regress", "--plan", "plan5", "--report", str(good)).returncode == 0
    missing = _lever("regress", "--plan", "plan5", "--report", str(tmp_path / "nope.json"))
    assert missing.returncode == 2
    garbled = tmp_path / "g.json"
    garbled.write_text('{"shots": {}}')
    assert _lever("regress", "--plan", "plan5", "--report", str(garbled)).returncode == 2


def test_cli_finds_the_report_in_the_store(tmp_path):
    """The report is located by the summarize unit's content key (the runner's own keys)."""
    from lever.config import load_plan
    from lever.pipeline.runner import Pipeline
    from lever.storage.backends import open_store

    store = open_store(str(tmp_path / "store"))
    pipe = Pipeline(load_plan("plan5", "tiny"), store, baseline=load_plan("baseline", "tiny"))
    unit = pipe.select_units("summarize")[0]
    key = pipe.key("summarize", unit)
    with store.staging(key) as st:
        (st.path / "report.json").write_text(json.dumps(report(s1=(40.0, 48.0, -11.0, -5.0))))
        store.commit(key, {"stage": "summarize"})
    args = ("regress", "--plan", "plan5", "--baseline", "baseline", "--profile", "tiny", "--store", str(tmp_path / "store"))
    r = _lever(*args)
    assert r.returncode == 1, r.stderr
    other = _lever("regress", "--plan", "plan1", "--baseline", "baseline", "--profile", "tiny",
                   "--store", str(tmp_path / "store"))
    assert other.returncode == 2 and "run the plan first" in other.stderr


def test_summarizer_report_format_is_understood():
    """The summarizer's own report.json layout (comparison list, CI under 'paired', percent)."""
    from lever.report.bootstrap import PairedCI

    def entry(shot, plan, base, lo, hi):
        ci = PairedCI(n=800, diff=(plan - base) / 100, low=lo / 100, high=hi / 100, p_value=0.01)
        return {"shot": shot, "plan": plan, "baseline": base, "diff": round(plan - base, 4), "paired": ci.as_dict(100.0)}

    rep = {"units": "accuracy in percent (VQA accuracy x 100); predictions files hold 0..1",
           "baseline_plan": "baseline", "partial": False, "shots": [1, 2],
           "comparison": [entry(1, 41.0, 47.0, -8.9, -3.1), entry(2, 48.0, 47.5, -2.0, 3.0)]}
    v = judge(rep, plan="plan5", baseline="baseline", margin=1.5)
    assert [(s.shot, s.regression) for s in v.shots] == [("1", True), ("2", False)]
    assert v.shots[0].ci_high == pytest.approx(-3.1) and v.shots[0].plan == pytest.approx(41.0)
    with pytest.raises(ReportFormatError, match="partial"):
        judge(dict(rep, partial=True, missing=["infer/x"]), plan="plan5", baseline="baseline", margin=1.5)
    rep["comparison"][1]["baseline"] = None
    with pytest.raises(ReportFormatError, match="shot 2"):
        judge(rep, plan="plan5", baseline="baseline", margin=1.5)
