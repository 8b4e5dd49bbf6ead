"""`lever submit/status/logs/runs/delete/report --fetch` against a loopback Kubernetes API.

The official ``kubernetes`` client runs unpatched (kubeconfig loading, bearer token, URL building,
JSON decoding, the chunked watch stream); only the server is ours (tests/kube_fake.py).  Workflow
states follow Argo's ``WorkflowStatus``/``NodeStatus`` (``pkg/apis/workflow/v1alpha1/
workflow_types.go`` in argoproj/argo-workflows) and every recorded state is validated against the
official Argo JSON schema in shared/schemas, whose ``io.argoproj.workflow.v1alpha1.NodeStatus``
holds the same fields (a node's exit code lives in ``outputs.exitCode``, a string).
"""

from __future__ import annotations

import json

import pytest
import yaml

from kube_fake import ArgoRun, FakeKube, FakeKubeServer
from lever.pipeline.graph import STAGES
import manifest_validation as validation
from lever.platform import render
from lever.platform.runs import run_status

NS = "lever"
FANOUT_UNITS = {"generate-beams": ["shard0-of2", "shard1-of2"], "generate-rl-data": ["shard0-of2", "shard1-of2"],
                "infer": ["variantselector-shot1-shard0-of1,variantselector-shot2-shard0-of1",
                          "variantselector-shot3-shard0-of1", "variantselector-shot4-shard0-of1"]}


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from lever.cli import main

    try:
        main(list(args))
        rc = 0
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture()
def kube(tmp_path, monkeypatch):
    monkeypatch.delenv("ARGO_SERVER", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("LEVER_STORE_CACHE", str(tmp_path / "store-cache"))
    with FakeKubeServer(FakeKube()) as srv:
        monkeypatch.setenv("KUBECONFIG", str(srv.kubeconfig(tmp_path / "kubeconfig")))
        yield srv


def _stage_of_template(t: str) -> str:
    return {"summarize-partial": "summarize"}.get(t, t.split("-", 1)[1] if t.startswith(("stage-", "list-")) else t)


def _record_run(name: str, store: str, *, fail_at: str | None = None) -> tuple[list[dict], ArgoRun]:
    """The states a plan5 run passes through: one after each stage (and mid fan-out), both the
    baseline's pipeline and the plan's.  ``fail_at``: that plan stage's second unit is OOM-killed,
    retried, then exits 2 (never retried); the exit handler writes the partial report."""
    wf = render.plan_workflow("plan5").to_dict()
    wf["metadata"] = {"name": name, "namespace": NS, "labels": wf["metadata"]["labels"],
                      "creationTimestamp": "2026-11-20T10:00:00Z"}
    run = ArgoRun(wf, store=store)
    states = []
    for section in ("baseline", "pipeline"):
        run.section(section)
        for st in STAGES:
            if st.fanout == "none":
                run.unit(section, f"stage-{st.name}", st.name)
                states.append(run.snapshot())
                continue
            units = FANOUT_UNITS[st.name]
            run.unit(section, f"list-{st.name}", f"list-{st.name}", result=json.dumps(units))
            group = run.task_group(section, st.name)
            for i, u in enumerate(units):
                failing = section == "pipeline" and st.name == fail_at and i == 1
                attempts = (("Failed", "137"), ("Failed", "2")) if failing else (("Succeeded", "0"),)
                run.unit(section, f"stage-{st.name}", f"{st.name}({i}:{u})", parent=group, attempts=attempts,
                         unit_id=u)
                if i == 0:
                    states.append(run.snapshot())  # mid fan-out
                if failing:
                    run.end_group(group, "Failed")
                    run.end_section(section, "Failed")
                    run.exit_handler()
                    run.end("Failed", f"child '{run.nodes[group]['id']}' failed")
                    states.append(run.snapshot())
                    return states, run
            run.end_group(group, "Succeeded")
            states.append(run.snapshot())
        run.end_section(section, "Succeeded")
    run.exit_handler()
    run.end("Succeeded")
    states.append(run.snapshot())
    return states, run


# ------------------------------------------------------------------ the recorded states are Argo's shape


@pytest.mark.parametrize("version", ["v4.1.2", "v3.7.18"])
def test_recorded_states_pass_the_official_argo_schema(shared, version):
    ok, _ = _record_run("lever-plan5-abcde", "s3://b/lever")
    bad, _ = _record_run("lever-plan5-fghij", "s3://b/lever", fail_at="generate-rl-data")
    for state in (ok[0], ok[-1], bad[-1]):
        assert validation.validate_argo(state, shared, version) == []
    broken = json.loads(json.dumps(ok[-1]))
    next(iter(broken["status"]["nodes"].values()))["exitCode"] = "2"  # exit code is outputs.exitCode, not here
    assert validation.validate_argo(broken, shared, version) != []


def test_run_status_counts_units_retries_and_the_failed_node():
    states, run = _record_run("lever-plan5-abcde", "s3://b/lever", fail_at="generate-rl-data")
    mid = run_status(states[2])  # baseline generate-beams: list done, first of two shards done
    beams = next(p for p in mid.stages if p.section == "baseline" and p.stage == "generate-beams")
    assert (beams.phase, beams.done, beams.total) == ("Running", 1, 2)
    assert {p.phase for p in mid.stages if p.section == "plan"} == {"Pending"}  # not started is not running
    rs = run_status(states[-1])
    assert rs.phase == "Failed" and rs.partial_summarized and not rs.summarized
    rl = next(p for p in rs.stages if p.section == "plan" and p.stage == "generate-rl-data")
    assert (rl.phase, rl.done, rl.total, rl.failed, rl.retries) == ("Failed", 1, 2, 1, 1)
    (f,) = rs.failures  # the OOM-killed attempt was retried; only the final attempt counts
    assert f.exit_code == "2" and f.node.endswith("generate-rl-data(1:shard1-of2)(1)") and f.stage == "generate-rl-data"
    base = {p.stage: p.phase for p in rs.stages if p.section == "baseline"}
    assert set(base.values()) == {"Succeeded"}


# ------------------------------------------------------------------ submit


def test_submit_creates_exactly_one_workflow_equal_to_render(kube, capsys):
    rc, out, err = _cli(capsys, "submit", "plan5", "--set", "grpo.kl_beta=0.05", "-n", "lever")
    assert rc == 0, err
    (created,) = kube.fake.workflows.values()
    assert out.strip() == created["metadata"]["name"]
    rc, rendered, err = _cli(capsys, "render", "plan5", "--set", "grpo.kl_beta=0.05")
    assert rc == 0, err
    assert created["spec"] == yaml.safe_load(rendered)["spec"]
    assert created["metadata"]["labels"]["lever.dev/plan"] == "plan5"
    (post,) = kube.fake.created()
    assert post[1] == "/apis/argoproj.io/v1alpha1/namespaces/lever/workflows"


def test_submit_namespace_comes_from_the_kubeconfig_context(kube, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path / "kc2", namespace="ml-team")))
    assert _cli(capsys, "submit", "plan1")[0] == 0
    ((ns, _),) = kube.fake.workflows.keys()
    assert ns == "ml-team"


def test_submit_retries_a_generate_name_collision(kube, capsys):
    kube.fake.conflicts_left = 1
    rc, out, err = _cli(capsys, "submit", "plan5", "-n", NS)
    assert rc == 0, err
    assert len(kube.fake.created()) == 2 and len(kube.fake.workflows) == 1


def test_bad_input_is_one_line_exit_2_and_creates_nothing(kube, capsys, tmp_path, monkeypatch):
    cases = [(("submit", "no-such-plan"), "unknown plan"),
             (("submit", "plan5", "--set", "grpo.kl_beta=abc"), "grpo.kl_beta"),
             (("submit", "plan5", "--set", "grpo.no_such_field=1"), "no_such_field")]
    for args, needle in cases:
        rc, out, err = _cli(capsys, *args)
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)
    assert kube.fake.requests == []  # validation happened before any request

    kube.fake.forbidden_namespaces.add("prod")
    rc, _, err = _cli(capsys, "submit", "plan5", "-n", "prod")
    assert rc == 2 and "forbidden" in err and "403" in err and len(err.strip().splitlines()) == 1

    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path / "expired", token="expired-token")))
    rc, _, err = _cli(capsys, "submit", "plan5")
    assert rc == 2 and "expired" in err and "401" in err and len(err.strip().splitlines()) == 1

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    rc, _, err = _cli(capsys, "submit", "plan5")
    assert rc == 2 and "no Kubernetes credentials" in err and "missing-kubeconfig" in err
    assert kube.fake.workflows == {}


def test_submit_via_argo_server_keeps_its_path(kube, capsys):
    rc, _, err = _cli(capsys, "submit", "plan5", "--via", "argo-server")
    assert rc == 2 and "ARGO_SERVER" in err and kube.fake.requests == []


# ------------------------------------------------------------------ status and watch


def _arrange(kube, name: str, store: str, fail_at: str | None = None) -> list[dict]:
    states, run = _record_run(name, store, fail_at=fail_at)
    kube.fake.add_workflow(states[0], later=states[1:])
    kube.fake.pods.extend(run.pod_objects(NS, _stage_of_template))
    for p in kube.fake.pods:
        kube.fake.logs[p["metadata"]["name"]] = "INFO lever: loading\nERROR lever: bad input\n"
    return states


def _summarize_key(store: str, plan: str = "plan5") -> str:
    from lever.cli.runs import report_location

    st, key = report_location({"plan": plan, "profile": "cluster", "store": store, "overrides": "[]"}, "x",
                              partial=False)
    return st.location(key, "report.md")


def test_status_watch_follows_stages_and_ends_with_the_report(kube, capsys):
    _arrange(kube, "lever-plan5-ok123", "s3://bucket/lever")
    rc, out, err = _cli(capsys, "status", "lever-plan5-ok123", "--watch")
    assert rc == 0, err
    lines = out.splitlines()
    order = [i for i, line in enumerate(lines) if "Succeeded" in line and "]" in line]
    stage_lines = [lines[i] for i in order]
    # stage by stage: the baseline's pipeline first, then the plan's, each stage once it finished
    expected = [f"baseline {s.name}" for s in STAGES] + [s.name for s in STAGES]
    seen = [next(e for e in expected if line.split("] ", 1)[1].startswith(e + " ")) for line in stage_lines]
    assert seen == expected
    assert any("generate-beams" in line and "1/2" in line and "Running" in line for line in lines)
    assert lines[-1] == f"report: {_summarize_key('s3://bucket/lever')}"
    watches = [r for r in kube.fake.requests if "watch" in r[2]]
    assert watches and watches[0][2]["fieldSelector"] == "metadata.name=lever-plan5-ok123", watches
    assert watches[0][2]["watch"].lower() == "true"


def test_status_watch_fails_naming_the_failed_node(kube, capsys):
    _arrange(kube, "lever-plan5-bad99", "s3://bucket/lever", fail_at="generate-rl-data")
    rc, out, err = _cli(capsys, "status", "lever-plan5-bad99", "--watch")
    assert rc == 1
    assert "generate-rl-data(1:shard1-of2)(1)" in err
    failed = [line for line in out.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "exit code 2" in failed[0] and "pod lever-plan5-bad99-stage-generate-rl-data-" in failed[0]
    assert "partial report: s3://bucket/lever/partial/plan5/lever-plan5-bad99/report.md" in out
    assert "generate-rl-data   Failed    1/2, 1 failed, 1 retries" in out


def test_status_json_and_lookup_by_plan(kube, capsys):
    states = _arrange(kube, "lever-plan5-ok123", "s3://bucket/lever")
    kube.fake.workflows[(NS, "lever-plan5-ok123")] = {**states[-1], "metadata": {**states[-1]["metadata"], "resourceVersion": "7"}}
    rc, out, err = _cli(capsys, "status", "plan5", "--json")  # a plan name: its newest run
    assert rc == 0, err
    data = json.loads(out)
    assert data["name"] == "lever-plan5-ok123" and data["phase"] == "Succeeded" and data["summarized"]
    infer = next(s for s in data["stages"] if s["section"] == "plan" and s["stage"] == "infer")
    assert (infer["done"], infer["total"]) == (3, 3)
    assert data["report"] == _summarize_key("s3://bucket/lever")
    rc, _, err = _cli(capsys, "status", "nothing-like-this")
    assert rc == 2 and "no workflow, run id or plan 'nothing-like-this'" in err


# ------------------------------------------------------------------ logs, runs, delete, report --fetch


def test_logs_of_a_stage_and_a_unit(kube, capsys):
    _arrange(kube, "lever-plan5-bad99", "s3://bucket/lever", fail_at="generate-rl-data")
    kube.fake.workflows[(NS, "lever-plan5-bad99")] = kube.fake.watch_states[(NS, "lever-plan5-bad99")][-1]  # finished
    rc, out, err = _cli(capsys, "logs", "lever-plan5-bad99", "--stage", "generate-rl-data", "--unit", "shard1-of2")
    assert rc == 0, err
    assert out.count("==> ") == 2 and "ERROR lever: bad input" in out  # both attempts' pods
    logs = [r for r in kube.fake.requests if r[1].endswith("/log")]
    assert logs and all(r[2]["container"] == "main" for r in logs)
    assert any(r[2].get("labelSelector") == "workflows.argoproj.io/workflow=lever-plan5-bad99,lever.dev/stage=generate-rl-data"
               for r in kube.fake.requests)
    rc, _, err = _cli(capsys, "logs", "lever-plan5-bad99", "--unit", "shard0-of2")
    assert rc == 1 and "no pods" in err
    rc, _, err = _cli(capsys, "logs", "lever-plan5-bad99", "--stage", "trian-v2")
    assert rc == 2 and "not a stage" in err


def _commit_report(store_dir, key: str, average_diff: float) -> None:
    from lever.storage.backends import open_store

    st = open_store(str(store_dir))
    with st.staging(key) as stg:
        (stg.path / "plots").mkdir(exist_ok=True)
        (stg.path / "plots" / "val_loss.png").write_bytes(b"\x89PNG fake")
        (stg.path / "report.md").write_text("# plan5 vs baseline\n")
        (stg.path / "report.json").write_text(json.dumps({"plan": "plan5", "average_diff": average_diff}))
        st.commit(key, {"stage": "summarize"})


def test_runs_report_fetch_and_delete(kube, capsys, tmp_path):
    store = tmp_path / "store"
    ok = _arrange(kube, "lever-plan5-ok123", str(store))
    kube.fake.workflows[(NS, "lever-plan5-ok123")] = ok[-1]
    running = _arrange(kube, "lever-plan1-run77", str(store))
    running[0]["metadata"]["labels"]["lever.dev/plan"] = "plan1"
    kube.fake.workflows[(NS, "lever-plan1-run77")] = running[0]
    from lever.cli.runs import report_location
    from lever.platform.runs import parameters

    _, key = report_location(parameters(ok[-1]), "lever-plan5-ok123", partial=False)
    _commit_report(store, key, 1.25)

    rc, out, err = _cli(capsys, "runs")
    assert rc == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"lever-plan5-ok123", "lever-plan1-run77"}
    assert rows["lever-plan5-ok123"].split()[-1] == "+1.25" and "Succeeded" in rows["lever-plan5-ok123"]
    assert rows["lever-plan1-run77"].split()[-1] == "-" and "Running" in rows["lever-plan1-run77"]
    rc, out, _ = _cli(capsys, "runs", "--plan", "plan1", "--json")
    assert [r["name"] for r in json.loads(out)] == ["lever-plan1-run77"]

    dest = tmp_path / "fetched"
    rc, out, err = _cli(capsys, "report", "lever-plan5-ok123", "--fetch", str(dest))
    assert rc == 0, err
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == \
        ["plots/val_loss.png", "report.json", "report.md"]
    rc, _, err = _cli(capsys, "report", "lever-plan1-run77", "--fetch", str(tmp_path / "x"))
    assert rc == 2 and "no report yet" in err

    rc, out, err = _cli(capsys, "delete", "lever-plan1-run77")
    assert rc == 0 and (NS, "lever-plan1-run77") not in kube.fake.workflows
    rc, _, err = _cli(capsys, "delete", "lever-plan1-run77")
    assert rc == 2 and "no workflow or run id" in err
    assert (NS, "lever-plan5-ok123") in kube.fake.workflows
