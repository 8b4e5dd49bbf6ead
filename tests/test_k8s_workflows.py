"""Argo manifests built from the stage graph: structure, official (closed) schemas, drift, CLI.

Schemas come from ../shared/schemas (``$LEVER_SHARED_DIR`` overrides); tests that need them skip
with a clear reason only when no such folder exists above the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lever.config import list_plans, load_plan
from lever.pipeline.graph import STAGES
import manifest_validation as validation
from lever.platform import render
from lever.platform.pods import RETRY_EXPRESSION
from lever.platform.workflows import (
    EXIT_HANDLER,
    LIST_FLAG,
    PARTIAL_FLAG,
    PIPELINE,
    TEMPLATE_NAME,
    UNIT_FLAG,
    UNIT_PARAM,
    list_task_name,
    stage_template_name,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    return render.rendered_files()


@pytest.fixture(scope="module")
def template(files) -> dict:
    return yaml.safe_load(files["workflows/lever-pipeline-template.yaml"])


@pytest.fixture(scope="module")
def cron(files) -> dict:
    return yaml.safe_load(files["workflows/nightly-cron.yaml"])


def _templates(doc: dict) -> dict[str, dict]:
    spec = doc["spec"].get("workflowSpec", doc["spec"])
    return {t["name"]: t for t in spec["templates"]}


def _tasks(doc: dict, dag: str) -> dict[str, dict]:
    return {t["name"]: t for t in _templates(doc)[dag]["dag"]["tasks"]}


def _params(task_or_spec: dict) -> dict[str, str]:
    return {p["name"]: p.get("value") for p in task_or_spec.get("arguments", {}).get("parameters", [])}


# ------------------------------------------------------------------ the DAG follows the graph

def test_one_task_per_stage_wired_by_inputs(template):
    tasks = _tasks(template, PIPELINE)
    expected = {s.name for s in STAGES} | {list_task_name(s) for s in STAGES if s.fanout != "none"}
    assert set(tasks) == expected
    for st in STAGES:
        task = tasks[st.name]
        assert task["template"] == stage_template_name(st)
        deps = set(task.get("dependencies", []))
        if st.fanout == "none":
            assert deps == set(st.may_read()), st.name  # incl. inputs only some plans read
            assert "withParam" not in task
        else:
            lst = list_task_name(st)
            assert deps == set(st.may_read()) | {lst}, st.name
            assert task["withParam"] == "{{tasks.%s.outputs.result}}" % lst
            assert set(tasks[lst].get("dependencies", [])) == set(st.may_read())


def test_fanout_tasks_select_one_unit_per_item(template):
    tmpl = _templates(template)
    tasks = _tasks(template, PIPELINE)
    fanned = [s for s in STAGES if s.fanout != "none"]
    assert {s.name for s in fanned} >= {"generate-beams", "generate-rl-data", "infer"}
    for st in fanned:
        args = tmpl[stage_template_name(st)]["container"]["args"]
        assert args[args.index(UNIT_FLAG) + 1] == "{{inputs.parameters.%s}}" % UNIT_PARAM
        assert _params(tasks[st.name])[UNIT_PARAM] == "{{item}}"
        lister = tmpl[list_task_name(st)]["container"]["args"]
        assert lister[:2] == ["stage", st.name] and LIST_FLAG in lister
    for st in (s for s in STAGES if s.fanout == "none"):
        assert UNIT_FLAG not in tmpl[stage_template_name(st)]["container"]["args"]


def test_list_units_output_feeds_with_param(tmp_path):
    """What ``--list-units`` prints is a JSON list of strings (Argo iterates it as ``{{item}}``)
    that ``--unit-id`` accepts back; checked against the real CLI for every fan-out kind."""
    from lever.config import load_plan
    from lever.pipeline.graph import stage

    for name in ("generate-rl-data", "infer"):
        res = _lever("stage", name, "--plan", "plan5", "--profile", "cluster", LIST_FLAG)
        assert res.returncode == 0, res.stderr
        items = json.loads(res.stdout)
        assert items and all(isinstance(i, str) for i in items)
        # one item per pod: a comma-joined group of unit ids covering every unit once, in order
        plan = load_plan("plan5", "cluster")
        assert [uid for item in items for uid in item.split(",")] == [u.id for u in stage(name).units(plan)]
        if name == "infer":
            assert len(items) == -(-len(stage(name).units(plan)) // plan.infer.units_per_pod)
        assert len(res.stdout) < 64 * 1024  # far below Argo's parameter cap


def test_rendered_flags_exist_in_the_cli(template, cron):
    """Every option the manifests pass must exist on the real typer commands (catches renames)."""
    import typer.main

    from lever.cli import app

    cmds = typer.main.get_command(app).commands
    opts = {n: {o for p in c.params for o in getattr(p, "opts", [])} for n, c in cmds.items()}
    for doc in (template, cron):
        for t in _templates(doc).values():
            if "container" not in t:
                continue
            args = t["container"]["args"]
            flags = {a for a in args if a.startswith("--")}
            assert flags <= opts[args[0]], (t["name"], flags - opts[args[0]])
    assert PARTIAL_FLAG in opts["stage"] and UNIT_FLAG in opts["stage"]


def test_stage_commands_follow_the_cli_contract(template):
    tmpl = _templates(template)
    for st in STAGES:
        c = tmpl[stage_template_name(st)]["container"]
        assert c["command"] == ["lever"]
        a = c["args"]
        assert a[:2] == ["stage", st.name]
        for flag in ("--plan", "--profile", "--store", "--run-id"):
            assert a[a.index(flag) + 1] == "{{inputs.parameters.%s}}" % flag[2:]


def test_gpu_stages_request_gpus_shm_and_placement(template):
    platform = render.cluster_platform()
    tmpl = _templates(template)
    gpu_stages = [s for s in STAGES if s.gpu]
    assert gpu_stages and any(not s.gpu for s in STAGES)
    for st in STAGES:
        t = tmpl[stage_template_name(st)]
        res = t["container"]["resources"]
        mounts = {m["name"]: m["mountPath"] for m in t["container"]["volumeMounts"]}
        vols = {v["name"]: v for v in t["volumes"]}
        if st.gpu:
            assert res["limits"]["nvidia.com/gpu"] == str(platform.gpu_per_pod)
            assert res["requests"]["nvidia.com/gpu"] == str(platform.gpu_per_pod)
            assert mounts["dshm"] == "/dev/shm" and vols["dshm"]["emptyDir"]["medium"] == "Memory"
            assert t["metadata"]["labels"]["lever.dev/gpu"] == "true"
            assert t.get("nodeSelector") == (platform.node_selector or None)
        else:
            assert "nvidia.com/gpu" not in res.get("limits", {})
            assert "dshm" not in mounts and "nodeSelector" not in t


def test_gpu_placement_comes_from_config():
    from lever.config.schema import PlatformConfig
    from lever.platform.workflows import build_pipeline_template

    cfg = PlatformConfig(gpu_per_pod=4, node_selector={"pool": "a100"},
                         tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}])
    doc = build_pipeline_template(cfg).to_dict()
    t = _templates(doc)["stage-train-grpo"]
    assert t["nodeSelector"] == {"pool": "a100"}
    assert t["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert t["container"]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert "nodeSelector" not in _templates(doc)["stage-convert"]


def test_every_pod_template_retries_infrastructure_failures_only(template, cron):
    for doc in (template, cron):
        for name, t in _templates(doc).items():
            if "container" not in t:
                continue
            rs = t["retryStrategy"]
            assert rs["retryPolicy"] == "Always" and int(rs["limit"]) >= 1, name
            assert rs["backoff"]["duration"] and int(rs["backoff"]["factor"]) >= 2, name
            if name == "regress":  # exit 1 is the verdict: only Error nodes are retried
                assert rs["expression"] == 'lastRetry.status == "Error"'
            else:
                assert rs["expression"] == RETRY_EXPRESSION
                assert 'lastRetry.exitCode != "2"' in rs["expression"]


def test_pods_are_locked_down_and_reference_the_secret(template, cron):
    for doc in (template, cron):
        for name, t in _templates(doc).items():
            if "container" not in t:
                continue
            c = t["container"]
            assert t["securityContext"]["runAsNonRoot"] is True and t["securityContext"]["runAsUser"] > 0
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp", "/cache"}
            env = {e["name"]: e for e in c["env"]}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
                assert "value" not in env[key], f"{name}: {key} must come from the Secret"
                assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key
            assert env["LEVER_PUSHGATEWAY_URL"]["value"] == "{{inputs.parameters.pushgateway}}"
            assert t["serviceAccountName"] == render.cluster_platform().service_account


def test_pods_that_read_data_or_models_mount_the_provisioned_volumes_offline(template, cron):
    """Stages that read the dataset or load a pretrained model mount the data volume and the model
    snapshots read-only (claims from parameters); every pod runs with the hub offline switches,
    so nothing downloads a model behind the operator's back."""
    from lever.platform.workflows import reads_provisioned_inputs

    tmpl = _templates(template)
    readers = {s.name for s in STAGES if reads_provisioned_inputs(s)}
    # train-grpo: online rollouts (grpo.rollout online) load the LVLM and read the dataset's images
    assert readers == {"prepare-data", "export-embeddings", "generate-beams", "generate-rl-data", "train-grpo", "infer"}
    for st in STAGES:
        t = tmpl[stage_template_name(st)]
        vols = {v["name"]: v for v in t["volumes"]}
        mounts = {m["name"]: m for m in t["container"]["volumeMounts"]}
        if st.name in readers:
            assert vols["data"]["persistentVolumeClaim"] == {"claimName": "{{inputs.parameters.data-pvc}}",
                                                             "readOnly": True}
            assert vols["models"]["persistentVolumeClaim"]["claimName"] == "{{inputs.parameters.models-pvc}}"
            assert mounts["data"] == {"name": "data", "mountPath": "/data", "readOnly": True}
            assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
        else:
            assert "data" not in vols and "models" not in vols, st.name
    plan = load_plan(render.recommended_plan(), "cluster")
    assert plan.data.root.startswith("/data/") and plan.models.root == "/models"
    for doc in (template, cron):
        for name, t in _templates(doc).items():
            if "container" in t:
                env = {e["name"]: e.get("value") for e in t["container"]["env"]}
                assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1", name


def test_overrides_reach_every_pod_and_the_baseline_gets_its_share(template, cron):
    params = _params(template["spec"])
    assert params["overrides"] == "[]" and params["data-pvc"] and params["models-pvc"]
    for doc in (template, cron):
        for name, t in _templates(doc).items():
            if "container" not in t:
                continue
            a = t["container"]["args"]
            assert a[a.index("--overrides") + 1] == "{{inputs.parameters.overrides}}", name
            if a[0] == "stage":
                assert a[a.index("--overrides-role") + 1] == "{{inputs.parameters.role}}", name
    entry = _tasks(template, template["spec"]["entrypoint"])
    assert _params(entry["baseline"])["role"] == "baseline" and _params(entry[PIPELINE])["role"] == "plan"
    nightly = _tasks(cron, cron["spec"]["workflowSpec"]["entrypoint"])
    assert _params(nightly["baseline"])["role"] == "baseline" and _params(nightly["candidate"])["role"] == "plan"


def test_render_set_validates_and_fills_the_overrides_parameter(shared):
    res = _lever("render", "plan5", "--set", "lvlm.name=/models/my-qwen", "--set", "infer.shots=[1, 2]")
    assert res.returncode == 0, res.stderr
    (doc,) = validation.load_documents(res.stdout)
    assert validation.validate_argo(doc, shared) == []
    assert json.loads(_params(doc["spec"])["overrides"]) == ["lvlm.name=/models/my-qwen", "infer.shots=[1, 2]"]
    bad = _lever("render", "plan5", "--set", "lvlm.nmae=x")
    assert bad.returncode == 2 and "lvlm.nmae" in bad.stderr and not bad.stdout
    url = _lever("render", "plan5", "--set", "data.root=s3://bucket/okvqa")  # data comes from the volume
    assert url.returncode == 2 and "field 'data.root'" in url.stderr and "data volume" in url.stderr


def test_stage_pods_apply_the_overrides_parameter(tmp_path):
    """What a pod runs: --overrides (JSON) changes the plan the stage sees; role baseline keeps only
    the overrides a baseline shares, so its keys match what the plan's summarizer looks up."""
    ov = json.dumps(["infer.shards=3", "grpo.kl_beta=0.05"])
    res = _lever("stage", "infer", "--plan", "plan5", "--profile", "cluster", "--overrides", ov, LIST_FLAG)
    assert res.returncode == 0, res.stderr
    assert all(i.endswith("-of3") for i in json.loads(res.stdout))
    from lever.cli.pipeline import _all_overrides

    assert _all_overrides([], ov, "baseline") == ["infer.shards=3"]
    assert _all_overrides(["seed=1"], ov, "plan") == ["seed=1", "infer.shards=3", "grpo.kl_beta=0.05"]
    bad = _lever("stage", "infer", "--plan", "plan5", "--overrides", "lvlm.name=x", LIST_FLAG)
    assert bad.returncode == 2 and "JSON list" in bad.stderr


def test_models_pull_template_writes_the_volume_online(files, shared):
    (doc,) = validation.load_documents(files["workflows/lever-models-pull-template.yaml"])
    for version in ("v4.1.2", "v3.7.18"):
        assert validation.validate_argo(doc, shared, version) == []
    (pull,) = [t for t in _templates(doc).values() if "container" in t]
    args = pull["container"]["args"]
    assert args[:2] == ["models", "pull"] and args[args.index("--to") + 1] == "{{inputs.parameters.to}}"
    env = {e["name"] for e in pull["container"]["env"]}
    assert "HF_HUB_OFFLINE" not in env and "HF_TOKEN" in env
    (vol,) = [v for v in pull["volumes"] if v["name"] == "models"]
    assert vol["persistentVolumeClaim"]["readOnly"] is False
    assert _params(doc["spec"])["to"] == "/models"
    assert pull["retryStrategy"]["expression"] == RETRY_EXPRESSION  # exit 2 (not provisionable) never retried


def test_exit_handler_always_runs_partial_summary(template):
    spec = template["spec"]
    handler = _templates(template)[spec["onExit"]]
    (task,) = handler["dag"]["tasks"]
    assert "when" not in task  # always, not only on failure
    args = _templates(template)[task["template"]]["container"]["args"]
    assert task["template"] == EXIT_HANDLER
    assert args[:2] == ["stage", "summarize"] and PARTIAL_FLAG in args


def test_template_parameters(template):
    params = _params(template["spec"])
    assert set(params) >= {"plan", "profile", "image", "store", "run-id"}
    assert params["plan"] == render.recommended_plan() and params["profile"] == "cluster"
    assert all(validation.image_is_pinned(params[k]) for k in ("image", "slim-image"))
    entry = _tasks(template, template["spec"]["entrypoint"])[PIPELINE]
    assert "workflow.name" in _params(entry)["run-id"]  # empty run-id falls back to the workflow name


def test_entry_runs_the_baseline_pipeline_first(template):
    tasks = _tasks(template, template["spec"]["entrypoint"])
    assert set(tasks) == {"baseline", PIPELINE}
    assert tasks["baseline"]["template"] == tasks[PIPELINE]["template"] == PIPELINE
    assert _params(tasks["baseline"])["plan"] == "{{workflow.parameters.baseline}}"
    assert tasks[PIPELINE]["dependencies"] == ["baseline"]
    when = tasks["baseline"]["when"]
    assert "workflow.parameters.baseline != 'none'" in when and "workflow.parameters.plan" in when
    assert _params(template["spec"])["baseline"] == "baseline"


def test_plan_workflows_reference_the_template(files):
    for name in list_plans():
        doc = yaml.safe_load(files[f"workflows/{name}.yaml"])
        assert doc["kind"] == "Workflow"
        assert doc["spec"]["workflowTemplateRef"] == {"name": TEMPLATE_NAME}
        assert doc["metadata"]["generateName"].startswith("lever-")
        expected = {"plan": name, "profile": "cluster"}
        base = load_plan(name).baseline_plan
        if base != "baseline":  # the template's default
            expected["baseline"] = base if base and base != name else "none"
        assert _params(doc["spec"]) == expected
        assert set(doc["spec"]) == {"workflowTemplateRef", "arguments"}


# ------------------------------------------------------------------ nightly

def test_nightly_cron_runs_recommended_plan_against_baseline(cron):
    rec = load_plan(render.recommended_plan(), "cluster")
    assert rec.recommended and rec.name == "plan5"
    spec = cron["spec"]
    assert spec["schedules"] and spec["timezone"]
    assert spec["concurrencyPolicy"] == "Forbid" and spec["startingDeadlineSeconds"] > 0
    wf = spec["workflowSpec"]
    params = _params(wf)
    assert params["plan"] == rec.name and params["baseline"] == rec.baseline_plan
    assert float(params["margin"]) == rec.alerts.regression_margin
    tasks = _tasks(cron, wf["entrypoint"])
    assert tasks["baseline"]["templateRef"] == {"name": TEMPLATE_NAME, "template": PIPELINE}
    assert _params(tasks["baseline"])["plan"] == "{{workflow.parameters.baseline}}"
    assert _params(tasks["candidate"])["plan"] == "{{workflow.parameters.plan}}"
    assert tasks["regress"]["dependencies"] == ["candidate"]
    args = _templates(cron)["regress"]["container"]["args"]
    assert args[0] == "regress" and {"--plan", "--baseline", "--margin", "--store"} <= set(args)
    exit_tasks = _tasks(cron, wf["onExit"])
    assert exit_tasks["summarize"]["templateRef"]["template"] == EXIT_HANDLER


# ------------------------------------------------------------------ schemas

@pytest.mark.parametrize("version", ["v4.1.2", "v3.7.18"])
def test_committed_manifests_pass_closed_argo_schema(shared, version):
    paths = sorted((ROOT / "workflows").glob("*.yaml"))
    assert len(paths) == len(list_plans()) + 3  # + pipeline template, models-pull template, nightly cron
    for path in paths:
        for doc in validation.load_documents(path.read_text()):
            assert validation.validate_argo(doc, shared, version) == [], path.name
            assert validation.structural_problems(doc) == [], path.name


def test_closed_schema_catches_what_the_open_one_misses(shared, template):
    import copy

    doc = copy.deepcopy(template)
    doc["spec"]["templates"][0]["retryStrategy"]["retryPolicyy"] = "Always"
    doc["spec"]["templates"][0]["container"]["resource"] = {}
    assert validation.validate_argo(doc, shared, closed=False) == []
    errs = validation.validate_argo(doc, shared)
    assert any("retryPolicyy" in e for e in errs) and any("'resource'" in e for e in errs)
    bad = copy.deepcopy(template)
    bad["spec"]["templates"][0]["retryStrategy"]["limit"] = {"n": 3}
    assert validation.validate_argo(bad, shared, closed=False)  # wrong type fails even open


def test_structural_checks_can_fail(template):
    import copy

    doc = copy.deepcopy(template)
    t = next(t for t in doc["spec"]["templates"] if t["name"] == "stage-infer")
    del t["retryStrategy"]
    del t["container"]["resources"]["limits"]["nvidia.com/gpu"]
    t["container"]["image"] = "ghcr.io/lever-ml/lever:latest"
    _templates(doc)[PIPELINE]["dag"]["tasks"].append({"name": "infer", "template": "stage-infer"})
    probs = "\n".join(validation.structural_problems(doc))
    for needle in ("no retryStrategy", "without a nvidia.com/gpu limit", "not pinned", "duplicate task names"):
        assert needle in probs


# ------------------------------------------------------------------ drift and CLI

def test_committed_files_match_the_code(files):
    stale = []
    for rel, text in files.items():
        path = ROOT / rel
        if not path.exists() or path.read_text() != text:
            stale.append(rel)
    extra = {p.name for p in (ROOT / "workflows").glob("*.yaml")} - {Path(r).name for r in files if r.startswith("workflows/")}
    assert not stale and not extra, (
        f"generated manifests are out of date ({stale}; unexpected: {sorted(extra)}): "
        "run scripts/render_workflows.sh and commit the result")


def _lever(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lever", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_render_cli_plan5_validates(shared, tmp_path):
    res = _lever("render", "plan5")
    assert res.returncode == 0, res.stderr
    (doc,) = validation.load_documents(res.stdout)
    assert validation.validate_argo(doc, shared) == []
    assert _params(doc["spec"])["plan"] == "plan5"
    out = tmp_path / "p5.yaml"
    assert _lever("render", "plan5", "-o", str(out)).returncode == 0
    assert yaml.safe_load(out.read_text()) == doc
    bad = _lever("render", "no-such-plan")
    assert bad.returncode == 2 and "unknown plan" in bad.stderr


def test_render_all_writes_the_same_files(tmp_path, files):
    res = _lever("render", "--all", "--out", str(tmp_path / "wf"), "--chart", str(tmp_path / "chart"))
    assert res.returncode == 0, res.stderr
    for rel, text in files.items():
        base = tmp_path / "chart" / "files" if rel.startswith("helm/") else tmp_path / "wf"
        assert (base / Path(rel).name).read_text() == text


class _FakeResponse:
    def __init__(self, body: dict, status: int = 200):
        self._body, self.status_code, self.ok = body, status, status < 400
        self.text = json.dumps(body)

    def json(self) -> dict:
        return self._body


class _RecordingSession:
    """Stands in for requests.Session: records the request Hera builds, answers like Argo."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def request(self, method: str, **kw):
        self.calls.append({"method": method, **kw})
        wf = json.loads(kw["data"])["workflow"]
        wf["metadata"]["name"] = wf["metadata"]["generateName"] + "x7k2p"
        return _FakeResponse(wf)

    def close(self) -> None:
        pass


@pytest.mark.filterwarnings("ignore:The `json` method is deprecated:DeprecationWarning")
def test_submit_builds_the_argo_server_request():
    from lever.cli.k8s import build_submission

    session = _RecordingSession()
    wf = build_submission("plan5", "cluster", host="https://argo.example:2746", token="s3cr3t",
                          namespace="ml", session=session)
    created = wf.create()
    (call,) = session.calls
    assert call["method"] == "post"
    assert call["url"] == "https://argo.example:2746/api/v1/workflows/ml"
    assert call["headers"]["Authorization"] == "Bearer s3cr3t"
    body = json.loads(call["data"])["workflow"]
    assert body["spec"]["workflowTemplateRef"] == {"name": TEMPLATE_NAME}
    assert body["metadata"]["namespace"] == "ml"
    assert {p["name"]: p["value"] for p in body["spec"]["arguments"]["parameters"]}["plan"] == "plan5"
    assert created.metadata.name == "lever-plan5-x7k2p"
    link = wf.workflows_service.get_workflow_link(created.metadata.name)
    assert link == "https://argo.example:2746/workflows/ml/lever-plan5-x7k2p?tab=workflow"


def test_submit_without_server_is_a_user_error():
    env = {k: "" for k in ("ARGO_SERVER", "ARGO_TOKEN")}
    # --via argo-server: since issue 14 the default without ARGO_SERVER is the Kubernetes API
    res = _lever("submit", "plan5", "--via", "argo-server", env=env)
    assert res.returncode == 2 and "ARGO_SERVER" in res.stderr


@pytest.mark.filterwarnings("ignore:The `json` method is deprecated:DeprecationWarning")
def test_submit_sends_validated_overrides():
    from lever.cli.k8s import build_submission
    from lever.config.loader import PlanError

    session = _RecordingSession()
    wf = build_submission("plan5", "cluster", host="https://argo.example:2746", token=None, namespace="ml",
                          session=session, overrides=["models.root=s3://b/models", "infer.units_per_pod=4"])
    wf.create()
    (call,) = session.calls
    params = {p["name"]: p["value"] for p in json.loads(call["data"])["workflow"]["spec"]["arguments"]["parameters"]}
    assert json.loads(params["overrides"]) == ["models.root=s3://b/models", "infer.units_per_pod=4"]
    with pytest.raises(PlanError, match="infer.units_per_pod"):
        build_submission("plan5", "cluster", host="https://argo.example:2746", token=None, namespace="ml",
                         session=_RecordingSession(), overrides=["infer.units_per_pod=0"])


# ------------------------------------------------------------------ the label contract (docs/kubernetes.md)


def _pod_templates(doc: dict) -> list[dict]:
    return [t for t in _templates(doc).values() if "container" in t]


def test_every_pod_and_workflow_carries_the_run_labels(files, template, cron):
    """`lever status/logs/runs/delete` select on these labels: every pod template carries plan,
    run id and stage; Workflows get plan and run id (the template and the cron set them with
    workflowMetadata.labelsFrom, since the run id is the generated name)."""
    from lever.platform.pods import PLAN_LABEL, RUN_ID_LABEL, STAGE_LABEL
    from lever.platform.workflows import RUN_ID_EXPR_BARE

    pull = yaml.safe_load(files["workflows/lever-models-pull-template.yaml"])
    for doc in (template, cron, pull):
        pods = _pod_templates(doc)
        assert pods
        for t in pods:
            labels = t["metadata"]["labels"]
            assert {PLAN_LABEL, RUN_ID_LABEL, STAGE_LABEL} <= set(labels), (doc["metadata"]["name"], t["name"])
            assert labels[PLAN_LABEL] == "{{inputs.parameters.plan}}" or doc is pull
    stage_pods = [t for t in _pod_templates(template) if t["name"].startswith("stage-")]
    assert {t["metadata"]["labels"][RUN_ID_LABEL] for t in stage_pods} == {"{{inputs.parameters.run-id}}"}
    for doc in (template, cron["spec"]["workflowSpec"], pull):
        spec = doc.get("spec", doc)
        label_from = spec["workflowMetadata"]["labelsFrom"]
        assert set(label_from) == {PLAN_LABEL, RUN_ID_LABEL}
    assert template["spec"]["workflowMetadata"]["labelsFrom"][RUN_ID_LABEL]["expression"] == RUN_ID_EXPR_BARE
    for name in list_plans():
        assert yaml.safe_load(files[f"workflows/{name}.yaml"])["metadata"]["labels"][PLAN_LABEL] == name


def test_finished_pods_and_runs_are_garbage_collected(template, cron, files):
    """Succeeded pods go at once (podGC), the Workflow and its remaining pods after a week (TTL);
    plan Workflows inherit both through workflowTemplateRef."""
    for spec in (template["spec"], cron["spec"]["workflowSpec"]):
        assert spec["podGC"] == {"strategy": "OnPodSuccess"}
        assert spec["ttlStrategy"] == {"secondsAfterCompletion": 7 * 24 * 3600}
    plan = yaml.safe_load(files["workflows/plan5.yaml"])
    assert plan["spec"]["workflowTemplateRef"] == {"name": TEMPLATE_NAME} and "podGC" not in plan["spec"]
