"""What a Lever Workflow object says about its run: stage progress, failures, the report's place.

Pure functions over the Workflow as the Kubernetes API returns it (a dict), so ``lever status``,
``lever runs`` and ``lever report --fetch`` read one shape whether it came from a single GET or
a watch event.  Field names follow Argo's ``WorkflowStatus`` / ``NodeStatus``
(``pkg/apis/workflow/v1alpha1/workflow_types.go``; the same fields in the official JSON schemas
under shared/schemas): ``status.phase``, ``status.progress`` ("done/total" pods),
``status.nodes{id: {name, displayName, type, templateName, phase, boundaryID, children,
outputs.exitCode, outputs.result, message, startedAt, finishedAt}}``.

How nodes map to stages: every Lever pod template has a retry strategy, so each task (or each
item of a fanned-out task) is a ``Retry`` node whose ``Pod`` children are the attempts; a unit is
one Retry node (or a bare Pod node).  The stage is the template name (``stage-<name>``); the
``pipeline`` DAG node the unit belongs to (its boundary) says whether it ran for the baseline
plan or the plan itself.  A fanned-out stage's total is the length of its ``list-<name>`` node's
``outputs.result`` (the JSON list ``lever stage X --list-units`` printed) once that has run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

from lever.pipeline.graph import STAGES
from lever.platform.workflows import EXIT_HANDLER, PIPELINE, SUMMARIZE_STAGE, list_template_name, stage_template_name

PLAN_LABEL = "lever.dev/plan"
RUN_ID_LABEL = "lever.dev/run-id"
STAGE_LABEL = "lever.dev/stage"
PART_OF_SELECTOR = "app.kubernetes.io/part-of=lever"

FINISHED = ("Succeeded", "Failed", "Error")
FAILED = ("Failed", "Error")
_SECTION_OF_DAG = {"baseline": "baseline", PIPELINE: "plan", "candidate": "plan"}  # nightly: baseline, candidate  # DAG task display name -> section


@dataclass
class StageProgress:
    section: str  # "baseline" (the baseline plan's pipeline) or "plan"
    stage: str
    phase: str  # Pending | Running | Succeeded | Failed | Skipped
    done: int
    total: Optional[int]  # None: a fan-out whose unit list is not known yet
    running: int = 0
    failed: int = 0
    retries: int = 0  # attempts beyond the first, over all units


@dataclass
class FailedNode:
    section: str
    stage: str
    node: str  # Argo's node name (workflow.task(item)(attempt))
    node_id: str
    phase: str
    exit_code: Optional[str]
    message: str
    pod: Optional[str] = None  # filled by the caller from the pods' node-id annotation


@dataclass
class RunStatus:
    name: str
    namespace: str
    plan: str
    run_id: str
    phase: str
    started: Optional[str]
    finished: Optional[str]
    progress: Optional[str]
    message: str
    parameters: dict[str, str]
    stages: list[StageProgress] = field(default_factory=list)
    failures: list[FailedNode] = field(default_factory=list)
    summarized: bool = False  # the plan's summarize unit succeeded (full report)
    partial_summarized: bool = False  # the exit handler's summarize succeeded (a partial report)
    report: Optional[str] = None  # filled by the caller (needs the plan config and the store)

    @property
    def finished_ok(self) -> bool:
        return self.phase == "Succeeded"

    @property
    def done(self) -> bool:
        return self.phase in FINISHED

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parameters(wf: dict) -> dict[str, str]:
    """The run's parameters: the template's defaults Argo stored in the status (Argo >= 3.0
    keeps ``status.storedWorkflowTemplateSpec`` for a ``workflowTemplateRef``), overridden by
    the Workflow's own ``spec.arguments``."""
    out: dict[str, str] = {}
    stored = (wf.get("status") or {}).get("storedWorkflowTemplateSpec") or {}
    for src in (stored.get("arguments") or {}, (wf.get("spec") or {}).get("arguments") or {}):
        for p in src.get("parameters") or []:
            if p.get("value") is not None:
                out[p["name"]] = str(p["value"])
    return out


def run_id(wf: dict, params: Optional[dict[str, str]] = None) -> str:
    """The ``run-id`` parameter, or the workflow's name (the template's RUN_ID_EXPR)."""
    params = parameters(wf) if params is None else params
    return params.get("run-id") or wf["metadata"].get("name", "")


def _stage_of(template: str) -> tuple[str, str]:
    """(kind, stage) for a template name: kind is stage | list | exit | other."""
    if template == EXIT_HANDLER:
        return "exit", SUMMARIZE_STAGE
    for st in STAGES:
        if template == stage_template_name(st):
            return "stage", st.name
        if template == list_template_name(st):
            return "list", st.name
    return "other", ""


def _section(nodes: dict[str, dict], node: dict) -> str:
    seen = 0
    b = node.get("boundaryID")
    while b and b in nodes and seen < 64:
        parent = nodes[b]
        if parent.get("templateName") == PIPELINE:
            return _SECTION_OF_DAG.get(parent.get("displayName", ""), "plan")
        b = parent.get("boundaryID")
        seen += 1
    return "plan"


def _list_total(node: dict) -> Optional[int]:
    result = ((node.get("outputs") or {}).get("result") or "").strip()
    try:
        items = json.loads(result)
    except ValueError:
        return None
    return len(items) if isinstance(items, list) else None


def _aggregate(units: list[dict], total: Optional[int], skipped: bool, listed: bool) -> tuple[str, int, int, int]:
    """(phase, done, running, failed) of one stage; ``listed``: its unit list is known (fan-out)."""
    done = sum(u.get("phase") == "Succeeded" for u in units)
    running = sum(u.get("phase") in ("Running", "Pending") for u in units)
    failed = sum(u.get("phase") in FAILED for u in units)
    if failed:
        phase = "Failed"
    elif running:
        phase = "Running"
    elif units and total is not None and done >= total:
        phase = "Succeeded"
    elif skipped or (units and all(u.get("phase") in ("Skipped", "Omitted") for u in units)):
        phase = "Skipped"
    elif units or listed:
        phase = "Running"
    else:
        phase = "Pending"
    return phase, done, running, failed


def run_status(wf: dict) -> RunStatus:
    """Digest one Workflow object (see the module docstring for the node model)."""
    meta, status = wf.get("metadata") or {}, wf.get("status") or {}
    params = parameters(wf)
    nodes: dict[str, dict] = status.get("nodes") or {}
    parent_of = {c: nid for nid, n in nodes.items() for c in (n.get("children") or [])}

    units: dict[tuple[str, str], list[dict]] = {}
    totals: dict[tuple[str, str], Optional[int]] = {}
    skipped: set[tuple[str, str]] = set()
    retries: dict[tuple[str, str], int] = {}
    failures: list[FailedNode] = []
    summarized = partial = False
    for nid, n in nodes.items():
        kind, stage = _stage_of(n.get("templateName", ""))
        if kind == "other":
            continue
        ntype = n.get("type")
        under_retry = nodes.get(parent_of.get(nid, ""), {}).get("type") == "Retry"
        section = _section(nodes, n)
        key = (section, stage)
        if kind == "exit":
            if ntype == "Pod" and n.get("phase") == "Succeeded":
                partial = True
        elif kind == "list":
            if ntype in ("Retry", "Pod") and not under_retry and n.get("phase") == "Succeeded":
                totals[key] = _list_total(n) if _list_total(n) is not None else totals.get(key)
            if n.get("phase") in ("Skipped", "Omitted"):
                skipped.add(key)
        elif ntype == "Retry" or (ntype == "Pod" and not under_retry):
            units.setdefault(key, []).append(n)
            if ntype == "Retry":
                retries[key] = retries.get(key, 0) + max(0, len(n.get("children") or []) - 1)
            if stage == SUMMARIZE_STAGE and section == "plan" and n.get("phase") == "Succeeded":
                summarized = True
        elif ntype in ("Skipped",) or n.get("phase") in ("Skipped", "Omitted"):
            skipped.add(key)
        # a unit that failed for good: its last attempt (a retried attempt that later succeeded is not)
        last = n
        if ntype == "Retry" and n.get("phase") in FAILED and n.get("children"):
            last = nodes.get(n["children"][-1], n)
        if (ntype == "Retry" or (ntype == "Pod" and not under_retry)) and last.get("phase") in FAILED:
            failures.append(FailedNode(section, stage, last.get("name") or last.get("displayName", nid), last["id"],
                                       last["phase"], (last.get("outputs") or {}).get("exitCode"),
                                       last.get("message") or n.get("message", "")))

    stages: list[StageProgress] = []
    sections = ["baseline", "plan"] if any(k[0] == "baseline" for k in (*units, *totals)) else ["plan"]
    for section in sections:
        for st in STAGES:
            key = (section, st.name)
            us = units.get(key, [])
            total = totals.get(key) if st.fanout != "none" else 1
            if st.fanout != "none" and total is None and us and key in totals:
                total = len(us)
            phase, done, running, failed = _aggregate(us, total, key in skipped, key in totals)
            stages.append(StageProgress(section, st.name, phase, done, total, running, failed, retries.get(key, 0)))
    labels = meta.get("labels") or {}
    return RunStatus(
        name=meta.get("name", ""), namespace=meta.get("namespace", ""),
        plan=params.get("plan") or labels.get(PLAN_LABEL, ""), run_id=run_id(wf, params),
        phase=status.get("phase") or "Pending", started=status.get("startedAt"), finished=status.get("finishedAt"),
        progress=status.get("progress"), message=status.get("message", ""), parameters=params,
        stages=stages, failures=failures, summarized=summarized, partial_summarized=partial)


def _ts(value: Optional[str]) -> Optional[datetime]:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def duration_s(started: Optional[str], finished: Optional[str], now: Optional[datetime] = None) -> Optional[float]:
    a = _ts(started)
    if a is None:
        return None
    b = _ts(finished) or now or datetime.now(timezone.utc)
    return (b - a).total_seconds()


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def stage_line(p: StageProgress) -> str:
    """One line per stage, as the non-interactive status and the watch print it."""
    total = "?" if p.total is None else str(p.total)
    extra = "".join([f", {p.running} running" if p.running else "", f", {p.failed} failed" if p.failed else "",
                     f", {p.retries} retries" if p.retries else ""])
    who = "baseline " if p.section == "baseline" else ""
    return f"{who}{p.stage:<18} {p.phase:<9} {p.done}/{total}{extra}"
