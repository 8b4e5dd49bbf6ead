"""Offline validation of rendered manifests with the official schemas (no cluster).

* Argo kinds: the upstream JSON schema (``shared/schemas/argo-workflows-v*.schema.json``) made
  *closed* in memory -- upstream never sets ``additionalProperties: false`` (argo issue 11021), so
  without this a misspelt key such as ``retryStrategy.retryPolicyy`` would pass.
* PrometheusRule: the CRD's v1 openAPIV3Schema.
* Core kinds: ``kubernetes-validate`` (bundled OpenAPI schemas, strict mode).
* Structural checks a schema cannot express (GPU limits on GPU stages, a retry strategy on
  every template, unique task names, no Helm expression left unrendered, pinned images).

A test helper (kept under tests/, not shipped in the package); usable by hand from here.
"""

from __future__ import annotations

import copy
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import yaml

ARGO_KINDS = ("Workflow", "WorkflowTemplate", "CronWorkflow", "ClusterWorkflowTemplate")
ARGO_SCHEMAS = {"v4.1.2": "argo-workflows-v4.1.2.schema.json", "v3.7.18": "argo-workflows-v3.7.18.schema.json"}
PROMRULE_SCHEMA = "prometheusrule-monitoring.coreos.com-v1.schema.json"
ENV_SHARED = "LEVER_SHARED_DIR"
KUBE_VERSION = "1.30.0"


def find_shared_dir(start: Optional[Path] = None) -> Optional[Path]:
    """``$LEVER_SHARED_DIR``, else the first ``shared/`` holding ``schemas/`` found walking up from
    ``start`` (a clone at X/main has it at X/shared; CI clones beside it the same way)."""
    env = os.environ.get(ENV_SHARED)
    if env:
        p = Path(env)
        return p if (p / "schemas").is_dir() else None
    here = (start or Path(__file__)).resolve()
    for parent in [here, *here.parents]:
        for cand in (parent / "shared", parent):
            if cand.name == "shared" and (cand / "schemas").is_dir():
                return cand
    return None


def load_documents(text: str) -> list[dict[str, Any]]:
    """Non-empty YAML documents of a (multi-document) manifest."""
    return [d for d in yaml.safe_load_all(text) if d]


def close_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy where every definition with ``properties`` rejects unknown keys."""
    out = copy.deepcopy(schema)
    for d in out.get("definitions", {}).values():
        if isinstance(d, dict) and "properties" in d and "additionalProperties" not in d:
            d["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def _argo_schema(shared: str, version: str, closed: bool) -> dict[str, Any]:
    schema = json.loads((Path(shared) / "schemas" / ARGO_SCHEMAS[version]).read_text())
    return close_schema(schema) if closed else schema


@lru_cache(maxsize=None)
def argo_validator(shared: str, version: str, kind: str, closed: bool = True):
    """A draft 2020-12 validator for one Argo kind (picking the kind's definition directly keeps
    error messages readable instead of the top-level ``oneOf`` over every kind)."""
    from jsonschema import Draft202012Validator

    base = _argo_schema(shared, version, closed)
    schema = {"$schema": base.get("$schema"), "definitions": base["definitions"],
              "$ref": f"#/definitions/io.argoproj.workflow.v1alpha1.{kind}"}
    return Draft202012Validator(schema)


@lru_cache(maxsize=None)
def argo_definition_validator(shared: str, version: str, definition: str, closed: bool = True):
    """Validator for any single definition (e.g. ``ArtifactRepository`` inside a ConfigMap)."""
    from jsonschema import Draft202012Validator

    base = _argo_schema(shared, version, closed)
    schema = {"$schema": base.get("$schema"), "definitions": base["definitions"],
              "$ref": f"#/definitions/{definition}"}
    return Draft202012Validator(schema)


def _errors(validator, doc: Any) -> list[str]:
    out = []
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in e.absolute_path) or "<root>"
        out.append(f"{where}: {e.message[:300]}")
    return out


def validate_argo(doc: dict[str, Any], shared: Path, version: str = "v4.1.2", closed: bool = True) -> list[str]:
    kind = doc.get("kind")
    if kind not in ARGO_KINDS:
        return [f"not an Argo kind: {kind!r}"]
    return _errors(argo_validator(str(shared), version, kind, closed), doc)


def validate_prometheus_rule(doc: dict[str, Any], shared: Path) -> list[str]:
    from jsonschema import Draft7Validator

    schema = json.loads((shared / "schemas" / PROMRULE_SCHEMA).read_text())
    errs = _errors(Draft7Validator(schema), doc)
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        errs.append(f"apiVersion {doc.get('apiVersion')!r} != monitoring.coreos.com/v1")
    return errs


def validate_core(doc: dict[str, Any], kube_version: str = KUBE_VERSION) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, kube_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'/'.join(str(p) for p in exc.path)}: {exc.message}"]
    return []


# ---------------------------------------------------------------- structural checks

def iter_templates(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc.get("kind") == "CronWorkflow":
        spec = spec.get("workflowSpec", {})
    yield from spec.get("templates", []) or []


def structural_problems(doc: dict[str, Any], gpu_resource: str = "nvidia.com/gpu") -> list[str]:
    """What a schema cannot say about an Argo document."""
    probs: list[str] = []
    names = [t.get("name") for t in iter_templates(doc)]
    if len(names) != len(set(names)):
        probs.append(f"duplicate template names: {sorted({n for n in names if names.count(n) > 1})}")
    for t in iter_templates(doc):
        name = t.get("name")
        if "container" in t or "script" in t:
            if not t.get("retryStrategy"):
                probs.append(f"template {name}: no retryStrategy")
            c = t.get("container") or t.get("script")
            img = c.get("image", "")
            if not img.startswith("{{") and not image_is_pinned(img):
                probs.append(f"template {name}: image {img!r} is not pinned")
            gpu = (t.get("metadata", {}).get("labels", {}) or {}).get("lever.dev/gpu") == "true"
            limits = (c.get("resources") or {}).get("limits") or {}
            if gpu and gpu_resource not in limits:
                probs.append(f"template {name}: GPU stage without a {gpu_resource} limit")
            if not gpu and gpu_resource in limits:
                probs.append(f"template {name}: CPU stage asks for a GPU")
            sc = c.get("securityContext") or {}
            psc = t.get("securityContext") or {}
            if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
                probs.append(f"template {name}: not runAsNonRoot")
        for key in ("dag", "steps"):
            if key == "dag" and t.get("dag"):
                tasks = [x["name"] for x in t["dag"].get("tasks", [])]
                if len(tasks) != len(set(tasks)):
                    probs.append(f"template {name}: duplicate task names")
                known = set(tasks)
                for x in t["dag"].get("tasks", []):
                    for dep in x.get("dependencies", []) or []:
                        if dep not in known:
                            probs.append(f"template {name}: task {x['name']} depends on unknown {dep}")
    return probs


# A Helm action left in rendered output: ``{{ .Values.x }}``, ``{{ include ...}}``, ``{{- if ...}}``,
# ``{{ $var }}``.  Argo's ``{{inputs.parameters.x}}`` / ``{{=expr}}`` and Prometheus' own
# ``{{ $labels.x }}`` / ``{{ $value }}`` (which YAML may fold across lines) are legitimate.
_HELM_LEFTOVER = re.compile(
    r"\{\{-?\s*(?:\.|(?:include|template|tpl|toYaml|if|else|range|end|with|define|required)\b|"
    r"\$(?!labels\b|value\b|externalLabels\b|externalURL\b))"
)


def unrendered_helm(text: str) -> list[str]:
    """Helm actions that survived rendering (see ``_HELM_LEFTOVER``)."""
    return [text[m.start(): m.start() + 40].split("\n")[0] for m in _HELM_LEFTOVER.finditer(text)]


def image_is_pinned(ref: str) -> bool:
    """``repo:tag`` with a tag other than ``latest``, or ``repo@sha256:...``."""
    if "@sha256:" in ref:
        return True
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    tag = last.rsplit(":", 1)[1]
    return bool(tag) and tag != "latest"


def images_in(doc: Any) -> Iterable[str]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "image" and isinstance(v, str):
                yield v
            else:
                yield from images_in(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from images_in(v)
