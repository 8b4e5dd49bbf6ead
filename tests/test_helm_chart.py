"""The Helm chart, rendered offline by Helm's own Go engine (helm-python-sdk), then every document
validated: Argo kinds against the closed official schema, the PrometheusRule against its CRD
schema, core kinds with kubernetes-validate, plus structural checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk (requirements-test.lock) not installed")

from lever.pipeline.graph import STAGES  # noqa: E402
import manifest_validation as validation  # noqa: E402
from lever.platform import render  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "lever"
VALUES_FILES = {
    "default": CHART / "values.yaml",
    "minimal": CHART / "ci" / "minimal-values.yaml",
    "production": CHART / "ci" / "production-values.yaml",
}
NAMESPACE = "ml-lever"
# files other helpers generate into the chart; documents built from them are skipped when absent
OPTIONAL_FILES = {"PrometheusRule": CHART / "files" / "alert-rules.yaml", "dashboard": CHART / "files" / "dashboard.json"}


@pytest.fixture(scope="module")
def chart():
    return helm_python.Chart.load(str(CHART))


def _values(name: str) -> dict:
    return yaml.safe_load(VALUES_FILES[name].read_text()) or {}


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, dict[str, str]]:
    return {name: chart.render(_values(name), name="lever", namespace=NAMESPACE) for name in VALUES_FILES}


def _docs(out: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".txt"):
            continue
        docs += validation.load_documents(text)
    return docs


def _by_kind(out: dict[str, str], kind: str) -> list[dict]:
    return [d for d in _docs(out) if d["kind"] == kind]


def _templates(doc: dict) -> list[dict]:
    return list(validation.iter_templates(doc))


@pytest.mark.parametrize("name", list(VALUES_FILES))
def test_values_files_pass_the_schema(chart, name):
    chart.validate_schema(_values(name))


@pytest.mark.parametrize("name", list(VALUES_FILES))
def test_every_rendered_document_validates(rendered, shared, name):
    out = rendered[name]
    docs = _docs(out)
    assert docs
    for path, text in out.items():
        assert validation.unrendered_helm(text) == [], path
    kinds = [d["kind"] for d in docs]
    assert "Secret" not in kinds, "the chart must reference Secrets, never create them"
    for doc in docs:
        kind = doc["kind"]
        assert doc["metadata"].get("namespace") == NAMESPACE, kind
        if kind in validation.ARGO_KINDS:
            for version in ("v4.1.2", "v3.7.18"):
                assert validation.validate_argo(doc, shared, version) == [], (kind, version)
            assert validation.structural_problems(doc) == [], kind
        elif kind == "PrometheusRule":
            assert validation.validate_prometheus_rule(doc, shared) == []
        else:
            assert validation.validate_core(doc) == [], kind


def test_kinds_per_values_file(rendered):
    kinds = {name: sorted(d["kind"] for d in _docs(out)) for name, out in rendered.items()}
    assert kinds["minimal"] == ["Role", "RoleBinding", "ServiceAccount", "WorkflowTemplate"]
    expected = {"WorkflowTemplate", "CronWorkflow", "ServiceAccount", "Role", "RoleBinding", "ConfigMap"}
    if OPTIONAL_FILES["PrometheusRule"].exists():
        expected.add("PrometheusRule")
    assert set(kinds["default"]) == expected == set(kinds["production"])


def test_lint_is_clean():
    for strict in (False, True):
        report = helm_python.lint(str(CHART), strict=strict)
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


@pytest.mark.parametrize("bad", [
    {"image": {"repository": "ghcr.io/lever-ml/lever", "tag": "latest"}},
    {"image": {"repository": "ghcr.io/lever-ml/lever", "tag": "0.1.0", "digest": "sha256:abc"}},
    {"gpu": {"count": 0}},
    {"gpu": {"count": 1, "tolerations": [{"key": "x", "operator": "Maybe"}]}},
    {"nightly": {"shedule": "0 2 * * *"}},
    {"nightly": {"schedule": "every night"}},
    {"store": "http://not-s3/prefix"},
    {"s3": {"secretName": "Bad_Name", "bucket": "b", "endpoint": "x"}},
    {"s3": {"secretName": "lever-s3", "bucket": "lever", "endpoint": "https://minio:9000"}},
    {"prometheusRule": {"enabled": True, "labels": {"release": 1}}},
    {"unknownTopLevel": True},
])
def test_bad_values_are_rejected(chart, bad):
    with pytest.raises(helm_python.HelmValuesError):
        chart.validate_schema(bad)
    with pytest.raises(helm_python.HelmValuesError):
        chart.render(bad, name="lever", namespace=NAMESPACE)


def test_values_schema_is_closed():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, where="<root>"):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and where != "<root>/global":
                assert node.get("additionalProperties") is False, where
            for k, v in node.get("properties", {}).items():
                walk(v, f"{where}/{k}")
            if isinstance(node.get("items"), dict):
                walk(node["items"], f"{where}[]")
    walk(schema)
    values = _values("default")
    assert set(values) <= set(schema["properties"])


def _named(out: dict[str, str], kind: str, name: str) -> dict:
    (doc,) = [d for d in _by_kind(out, kind) if d["metadata"]["name"] == name]
    return doc


def test_default_render_is_the_hera_output(rendered):
    """fromYaml/toYaml in the chart must not change the Hera document (numbers, Argo {{...}})."""
    for kind, built in (("WorkflowTemplate", render.pipeline_template()), ("CronWorkflow", render.nightly_cron()),
                        ("WorkflowTemplate", render.models_pull_template())):
        doc = _named(rendered["default"], kind, built.name)
        expected = built.to_dict()
        assert doc["metadata"].pop("namespace") == NAMESPACE
        for k, v in expected["metadata"]["labels"].items():
            assert doc["metadata"]["labels"][k] == v
        doc["metadata"]["labels"] = expected["metadata"]["labels"]
        assert doc == expected, kind


def test_production_values_reach_the_pods(rendered):
    v = _values("production")
    wt = _named(rendered["production"], "WorkflowTemplate", "lever-pipeline")
    (cron,) = _by_kind(rendered["production"], "CronWorkflow")
    params = {p["name"]: p["value"] for p in wt["spec"]["arguments"]["parameters"]}
    assert params["data-pvc"] == v["data"]["pvc"] and params["models-pvc"] == v["models"]["pvc"]
    assert params["image"] == f"{v['image']['repository']}@{v['image']['digest']}"
    assert params["slim-image"] == f"{v['slimImage']['repository']}:{v['slimImage']['tag']}"
    assert params["store"] == v["store"] and params["pushgateway"] == v["pushgatewayUrl"]
    assert cron["spec"]["schedules"] == [v["nightly"]["schedule"]]
    assert cron["spec"]["timezone"] == v["nightly"]["timezone"]
    cparams = {p["name"]: p["value"] for p in cron["spec"]["workflowSpec"]["arguments"]["parameters"]}
    assert cparams["margin"] == "2" and cparams["plan"] == "plan5"
    n_gpu = 0
    for doc in (wt, cron):
        assert doc["spec"].get("serviceAccountName", doc["spec"].get("workflowSpec", {}).get("serviceAccountName")) \
            == v["serviceAccount"]["name"]
        for t in _templates(doc):
            if "container" not in t:
                continue
            assert t["serviceAccountName"] == v["serviceAccount"]["name"]
            refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in t["container"]["env"] if "valueFrom" in e}
            assert refs == {v["s3"]["secretName"]}  # no HF token outside the models-pull job
            limits = t["container"]["resources"].get("limits", {})
            if t.get("metadata", {}).get("labels", {}).get("lever.dev/gpu") == "true":
                n_gpu += 1
                assert limits["nvidia.com/gpu"] == "2"
                assert t["nodeSelector"] == v["gpu"]["nodeSelector"]
                assert t["tolerations"] == v["gpu"]["tolerations"]
            else:
                assert "nvidia.com/gpu" not in limits and "nodeSelector" not in t and "tolerations" not in t
    assert n_gpu == sum(1 for s in STAGES if s.gpu)


def test_images_are_pinned(rendered):
    for name, out in rendered.items():
        for doc in _docs(out):
            for t in _templates(doc):
                img = (t.get("container") or {}).get("image")
                if img:
                    assert img.startswith("{{inputs.parameters."), img
            spec = doc.get("spec", {})
            spec = spec.get("workflowSpec", spec)
            for p in spec.get("arguments", {}).get("parameters", []) if isinstance(spec, dict) else []:
                if p["name"] in ("image", "slim-image"):
                    assert validation.image_is_pinned(p["value"]), (name, p)


def test_rbac_is_least_privilege(rendered):
    (role,) = _by_kind(rendered["default"], "Role")
    assert role["rules"] == [{"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}]
    (binding,) = _by_kind(rendered["default"], "RoleBinding")
    (sa,) = _by_kind(rendered["default"], "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    assert not _by_kind(rendered["default"], "ClusterRole")


def test_artifact_repository_references_the_secret(rendered, shared):
    (cm,) = [d for d in _by_kind(rendered["production"], "ConfigMap") if d["metadata"]["name"] == "artifact-repositories"]
    key = cm["metadata"]["annotations"]["workflows.argoproj.io/default-artifact-repository"]
    repo = yaml.safe_load(cm["data"][key])
    v = validation.argo_definition_validator(str(shared), "v4.1.2", "io.argoproj.workflow.v1alpha1.ArtifactRepository")
    assert list(v.iter_errors(repo)) == []
    s3 = repo["s3"]
    assert s3["accessKeySecret"] == {"name": "lever-minio", "key": "AWS_ACCESS_KEY_ID"}
    assert s3["secretKeySecret"] == {"name": "lever-minio", "key": "AWS_SECRET_ACCESS_KEY"}
    assert s3["endpoint"] == "minio.minio.svc:9000" and s3["insecure"] is True


def test_prometheus_rule_uses_the_selector_labels(rendered):
    assert OPTIONAL_FILES["PrometheusRule"].exists(), "run scripts/render_obs.sh"
    (rule,) = _by_kind(rendered["production"], "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "monitoring" and rule["metadata"]["labels"]["team"] == "ml"
    source = yaml.safe_load(OPTIONAL_FILES["PrometheusRule"].read_text())
    assert rule["spec"]["groups"] == source["groups"]  # Prometheus' {{ $labels }} survive Helm
    (default_rule,) = _by_kind(rendered["default"], "PrometheusRule")
    assert default_rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_dashboard_configmap_for_the_grafana_sidecar(rendered):
    assert OPTIONAL_FILES["dashboard"].exists(), "run scripts/render_obs.sh"
    (cm,) = [d for d in _by_kind(rendered["production"], "ConfigMap") if "dashboard" in d["metadata"]["name"]]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    (payload,) = cm["data"].values()
    assert json.loads(payload) == json.loads(OPTIONAL_FILES["dashboard"].read_text())


def test_missing_generated_file_fails_loudly(tmp_path):
    """A chart copy without the Hera output must not render an empty WorkflowTemplate."""
    import shutil

    dst = tmp_path / "lever"
    shutil.copytree(CHART, dst)
    (dst / "files" / "lever-pipeline-template.yaml").unlink()
    broken = helm_python.Chart.load(str(dst))
    with pytest.raises(helm_python.HelmRenderError, match="render_workflows"):
        broken.render({}, name="lever", namespace=NAMESPACE)


def _pod_templates(doc: dict) -> dict[str, dict]:
    return {t["name"]: t for t in _templates(doc) if "container" in t}


def test_models_pull_job_gets_the_volume_writable_and_the_hf_secret(rendered):
    v = _values("production")
    pull = _named(rendered["production"], "WorkflowTemplate", "lever-models-pull")
    params = {p["name"]: p["value"] for p in pull["spec"]["arguments"]["parameters"]}
    assert params["models-pvc"] == v["models"]["pvc"] and params["plan"] == v["modelsPull"]["plan"]
    (t,) = _pod_templates(pull).values()
    env = {e["name"]: e for e in t["container"]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": v["modelsPull"]["hfSecretName"], "key": "HF_TOKEN",
                                                            "optional": True}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == v["s3"]["secretName"]
    assert "HF_HUB_OFFLINE" not in env  # the one pod that may reach the hub
    (vol,) = [x for x in t["volumes"] if x["name"] == "models"]
    assert vol["persistentVolumeClaim"] == {"claimName": "{{inputs.parameters.models-pvc}}", "readOnly": False}


def test_an_empty_claim_drops_its_volume_and_mounts(rendered, shared):
    """minimal-values: models on S3 (models.pvc empty): no pod mounts a model volume, the data
    volume stays, and every document still passes the closed Argo schemas."""
    wt = _named(rendered["minimal"], "WorkflowTemplate", "lever-pipeline")
    with_data = 0
    for name, t in _pod_templates(wt).items():
        assert "models" not in {x["name"] for x in t["volumes"]}, name
        assert "models" not in {m["name"] for m in t["container"]["volumeMounts"]}, name
        with_data += "data" in {x["name"] for x in t["volumes"]}
    assert with_data >= 5  # prepare-data, export-embeddings, beams, rl-data, infer
    for version in ("v4.1.2", "v3.7.18"):
        assert validation.validate_argo(wt, shared, version) == []
    full = _named(rendered["default"], "WorkflowTemplate", "lever-pipeline")
    assert any("models" in {x["name"] for x in t["volumes"]} for t in _pod_templates(full).values())


@pytest.mark.parametrize("bad", [
    {"data": {"pvc": "Bad_Claim"}},
    {"models": {"pvc": "x", "size": "1Gi"}},
    {"modelsPull": {"enabled": True, "plan": "plan 5"}},
])
def test_bad_provisioning_values_are_rejected(chart, bad):
    with pytest.raises(helm_python.HelmValuesError):
        chart.validate_schema({**_values("default"), **bad})
