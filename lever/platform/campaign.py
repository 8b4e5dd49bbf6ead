"""A campaign as ONE Argo Workflow: every unique unit once, members as branches of one DAG.

Why static units instead of the plan template's ``list-*`` tasks: unit keys are computable from
the configs alone (``lever.pipeline.hashing``), so the renderer knows, before anything runs,
which units two members share.  It walks the pipelines (each member's baseline, then the member,
per seed) in graph order and gives each unit to the first pipeline that needs it: that task lists
it in ``withItems`` (pod groups, as ``--list-units`` would), and every later pipeline that reads
it depends on that task instead of building it again.  Shared upstream stages (data, embeddings,
beams, v2, RL data, RCE, the reference inferences, the baseline) therefore appear once, and the
members fan out as parallel branches below them.  Inside the workflow no unit is ever scheduled
twice; across workflows (two campaigns, the nightly) the store leases of ``run_unit`` keep one
builder per unit.

The tasks call the installed ``lever-pipeline`` template's ``stage-*`` templates through
``templateRef`` (one definition of a stage pod); the leaderboard step is defined here and reads
the campaign file from a raw input artifact, so no file has to be baked into the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import yaml
from hera.workflows import DAG, Container, CronWorkflow, Parameter, Task, Workflow
from hera.workflows.models import Artifact, RawArtifact, TemplateRef, WorkflowMetadata

from lever.campaign.loader import Campaign, CampaignError
from lever.config.loader import overrides_json
from lever.config.schema import PlanConfig, PlatformConfig
from lever.pipeline.graph import STAGES, UNIT_ID_SEP, pod_groups
from lever.pipeline.graph import stage as graph_stage
from lever.pipeline.hashing import PlanKeys, artifact_key, plan_keys
from lever.pipeline.runner import baseline_overrides, stage_closure
from lever.platform import pods
from lever.platform.workflows import (
    PARAM_NAMES,
    PART_OF,
    ROLE,
    RUN_ID_EXPR,
    TEMPLATE_NAME,
    UNIT_PARAM,
    Defaults,
    stage_template_name,
    workflow_spec_common,
)

ENTRY = "campaign"
LEADERBOARD = "leaderboard"
EXIT = "leaderboard-partial"
CAMPAIGN_PATH = "/tmp/lever-campaign/campaign.yaml"
WF_PARAMS = tuple(n for n in PARAM_NAMES if n not in ("plan", "overrides"))


@dataclass
class _Pipeline:
    slug: str
    plan: PlanConfig
    overrides: list[str]
    role: str
    keys: PlanKeys
    stages: list[str]
    baseline_keys: Optional[PlanKeys] = None


@dataclass
class CampaignTask:
    name: str
    stage: str
    pipeline: str
    items: Optional[list[str]]  # pod groups (comma-joined unit ids); None = single-unit stage
    dependencies: list[str]
    unit_keys: list[str]
    plan: str
    overrides: list[str]
    role: str


def _check_shipped(camp: Campaign, runs: list) -> None:
    from lever.config import list_plans

    shipped = set(list_plans())
    for m, _, plan, base in runs:
        for name in (m.plan, base.name):
            if name not in shipped:
                raise CampaignError(f"{camp.path}: member {m.name!r}: plan {name!r} is not a shipped plan; the pods "
                                    "only know the presets in the image (lever plans)")


def plan_tasks(camp: Campaign, runs: list) -> list[CampaignTask]:
    """The DAG as data: one task per (pipeline, stage) that has units no earlier pipeline claimed."""
    pipelines: list[_Pipeline] = []
    base_slugs: dict[str, str] = {}
    base_reads = [n for s in STAGES if s.with_baseline for n in s.inputs]
    for i, (member, seed, plan, base) in enumerate(runs, 1):
        ov = camp.overrides(member, seed)
        bov = baseline_overrides(ov)
        bkeys = plan_keys(base, STAGES)
        ident = repr(sorted(bkeys.stage_hash.items()))
        if ident not in base_slugs:
            base_slugs[ident] = f"base{len(base_slugs) + 1}" if base_slugs else "base"
            pipelines.append(_Pipeline(base_slugs[ident], base, bov, "baseline", bkeys, stage_closure(base_reads)))
        pipelines.append(_Pipeline(f"m{i}", plan, ov, "plan", plan_keys(plan, STAGES, bkeys), [s.name for s in STAGES],
                                   bkeys))
    owner: dict[str, str] = {}  # unit key -> task name
    tasks: list[CampaignTask] = []
    for p in pipelines:
        for st in STAGES:
            if st.name not in p.stages:
                continue
            units = [(u, artifact_key(st.name, h)) for u, h in p.keys.units[st.name]]
            new = [(u, k) for u, k in units if k not in owner]
            deps: set[str] = set()
            for u, _ in new:
                for name in st.inputs_for(u):
                    deps.update(owner[artifact_key(name, h)] for _, h in p.keys.units[name])
                if st.with_baseline and p.baseline_keys is not None:
                    bk = p.baseline_keys
                    for name in st.inputs:
                        deps.update(owner[artifact_key(name, h)] for _, h in bk.units[name])
            if not new:
                continue
            name = f"{p.slug}-{st.name}"
            wanted = {u for u, _ in new}
            items = None
            if st.fanout != "none":
                items = []
                for group in pod_groups(st, p.plan):
                    mine = [u for u in group if u in wanted]
                    if mine:
                        items.append(UNIT_ID_SEP.join(u.id for u in mine))
            for _, k in new:
                owner[k] = name
            tasks.append(CampaignTask(name, st.name, p.slug, items, sorted(deps - {name}), [k for _, k in new],
                                      p.plan.name, p.overrides, p.role))
    return tasks


def _wf(name: str) -> str:
    return "{{workflow.parameters.%s}}" % name


def _leaderboard_template(platform: PlatformConfig, campaign_yaml: str, name: str, fail_on_regression: bool) -> Container:
    args = ["campaign", "report", CAMPAIGN_PATH, "--profile", _wf("profile"), "--store", _wf("store"),
            "--run-id", RUN_ID_EXPR]
    if fail_on_regression:
        args.append("--fail-on-regression")
    return pods.lever_cpu_container(
        platform, name=name, image=_wf("slim-image"), args=args, pushgateway=_wf("pushgateway"), size="cpu",
        verdict_step=fail_on_regression,
        inputs=[Artifact(name="campaign", path=CAMPAIGN_PATH, raw=RawArtifact(data=campaign_yaml))],
        labels={**PART_OF, pods.STAGE_LABEL: "leaderboard", pods.ROLE_LABEL: name},
    )


def _dag(tasks: list[CampaignTask], profile_param: str = "profile") -> DAG:
    dag = DAG(name=ENTRY)
    depended = {d for t in tasks for d in t.dependencies}
    with dag:
        for t in tasks:
            args = {n: _wf(n) for n in PARAM_NAMES if n not in ("plan", "overrides", "run-id")}
            args.update({"plan": t.plan, "overrides": overrides_json(t.overrides), "run-id": RUN_ID_EXPR,
                         ROLE: t.role})
            kw = {}
            if t.items is not None:
                args[UNIT_PARAM] = "{{item}}"
                kw["with_items"] = t.items
            Task(name=t.name, template_ref=TemplateRef(name=TEMPLATE_NAME, template=stage_template_name(graph_stage(t.stage))),
                 arguments=args, dependencies=t.dependencies or None, **kw)
        Task(name=LEADERBOARD, template=LEADERBOARD, dependencies=sorted(t.name for t in tasks if t.name not in depended))
    return dag


def _campaign_yaml(camp: Campaign) -> str:
    return yaml.safe_dump(camp.config.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


def _parts(camp: Campaign, runs: list, platform: PlatformConfig, profile: str, fail_on_regression: bool):
    _check_shipped(camp, runs)
    tasks = plan_tasks(camp, runs)
    text = _campaign_yaml(camp)
    d = Defaults.from_platform(platform, plan=camp.name, profile=profile)
    params = [Parameter(name=n, value=d.value(n)) for n in WF_PARAMS]
    exit_dag = DAG(name="exit-handler")
    with exit_dag:
        Task(name=EXIT, template=EXIT)
    templates = [_dag(tasks), exit_dag,
                 _leaderboard_template(platform, text, LEADERBOARD, fail_on_regression),
                 _leaderboard_template(platform, text, EXIT, False)]
    return tasks, params, templates


def build_campaign_workflow(camp: Campaign, runs: list, platform: PlatformConfig, profile: str) -> Workflow:
    tasks, params, templates = _parts(camp, runs, platform, profile, fail_on_regression=False)
    wf = Workflow(
        generate_name=f"lever-campaign-{camp.name.replace('_', '-')}-",
        labels={**PART_OF, "lever.dev/campaign": camp.name},
        annotations={"workflows.argoproj.io/description":
                     f"Lever campaign {camp.name}: {len(camp.members)} member(s), {len(tasks)} stage task(s)"},
        entrypoint=ENTRY,
        on_exit="exit-handler",
        arguments=params,
        **workflow_spec_common(platform),
    )
    wf.templates = templates
    return wf


def build_campaign_cron(camp: Campaign, runs: list, platform: PlatformConfig, profile: str) -> CronWorkflow:
    """The nightly CronWorkflow running a campaign instead of plan vs baseline: same DAG, and the
    leaderboard step fails the run when a member is significantly worse than the baseline
    (Holm-adjusted, beyond ``leaderboard.margin``)."""
    from lever.platform.cron import CRON_NAME, nightly_schedule

    tasks, params, templates = _parts(camp, runs, platform, profile, fail_on_regression=True)
    cron = CronWorkflow(
        name=CRON_NAME,
        labels={**PART_OF, "lever.dev/campaign": camp.name},
        **nightly_schedule(platform),
        entrypoint=ENTRY,
        on_exit="exit-handler",
        arguments=params,
        workflow_metadata=WorkflowMetadata(labels={**PART_OF, "lever.dev/nightly": "true",
                                                   "lever.dev/campaign": camp.name}),
        **workflow_spec_common(platform),
    )
    cron.templates = templates
    return cron
