"""The ``lever-pipeline`` WorkflowTemplate and the per-plan Workflows, built from ``graph.STAGES``.

The DAG is derived from the stage table, never hand-listed: one task per stage, wired by the
stage's ``inputs``; a stage that fans out gets a ``list-<stage>`` task (``lever stage X
--list-units`` printing a small JSON list of unit ids) and its task runs ``withParam`` over that
list.  Stages exchange artifacts only through the S3 store, under the same content-addressed
keys as a local run, so a re-submitted plan skips finished stages.

Every template only reads ``inputs.parameters`` (never ``workflow.parameters``) so the nightly
CronWorkflow can call ``pipeline`` through ``templateRef`` twice with different plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from hera.workflows import DAG, Container, Parameter, Task, Workflow, WorkflowTemplate
from hera.workflows.models import LabelValueFrom, PodGC, TTLStrategy, WorkflowMetadata, WorkflowTemplateRef

from lever.config.schema import PlanConfig, PlatformConfig
from lever.pipeline.graph import STAGES, Stage
from lever.platform import pods

TEMPLATE_NAME = "lever-pipeline"
PIPELINE = "pipeline"  # the DAG template (callable by templateRef)
ENTRYPOINT = "main"  # resolves run-id once; the baseline plan's PIPELINE, then the plan's
EXIT_HANDLER = "summarize-partial"
SUMMARIZE_STAGE = "summarize"
PART_OF = {"app.kubernetes.io/part-of": "lever"}

# name -> what it means; the order is the order in the rendered manifests
PARAMS: tuple[tuple[str, str], ...] = (
    ("plan", "shipped plan name (lever plans)"),
    ("profile", "plan profile overlay (cluster | tiny)"),
    ("image", "CUDA image for stage pods"),
    ("slim-image", "CPU image for list-units, summarize and regress"),
    ("store", "artifact store URL, e.g. s3://bucket/prefix"),
    ("run-id", "groups metrics and logs; empty = the workflow name"),
    ("pushgateway", "Prometheus Pushgateway URL"),
    ("overrides", "JSON list of KEY=VALUE config overrides for every stage, e.g. "
                  "[\"lvlm.name=/models/my-qwen\"]; `lever render/submit PLAN --set K=V` validates and fills it"),
    ("data-pvc", "PersistentVolumeClaim with the datasets, mounted read-only at /data"),
    ("models-pvc", "PersistentVolumeClaim with the `lever models pull` snapshots, mounted read-only at /models"),
)
PARAM_NAMES = tuple(p for p, _ in PARAMS)
# Pipeline-internal input: "baseline" when the pipeline runs as the plan's baseline, whose pods
# then apply only the overrides a baseline shares (lever.pipeline.runner.baseline_overrides), so
# its keys are the ones the plan's summarizer looks up.
ROLE = "role"
ROLE_FLAG = "--overrides-role"
OVERRIDES_FLAG = "--overrides"
# Workflow-level only (not passed into the pipeline template): the summarizer compares against
# the baseline plan's outputs, so ``main`` runs that plan's pipeline first (a store hit once it
# has run) unless it is "none" or the plan itself.
BASELINE_PARAM = ("baseline", "plan the report compares against; its pipeline runs first ('none': skip)")
NO_BASELINE = "none"
DEFAULT_BASELINE = "baseline"


@dataclass(frozen=True)
class Defaults:
    """Default values of the template's parameters (what ``argo submit`` uses unless overridden)."""

    plan: str
    profile: str
    image: str
    slim_image: str
    store: str
    pushgateway: str
    data_pvc: str = ""
    models_pvc: str = ""
    overrides: str = "[]"

    @classmethod
    def from_platform(cls, platform: PlatformConfig, plan: str, profile: str = "cluster") -> "Defaults":
        return cls(plan, profile, platform.image, platform.slim_image, platform.store, platform.pushgateway_url,
                   platform.data_pvc, platform.models_pvc)

    def value(self, name: str) -> str:
        return {"plan": self.plan, "profile": self.profile, "image": self.image, "slim-image": self.slim_image,
                "store": self.store, "run-id": "", "pushgateway": self.pushgateway, "overrides": self.overrides,
                "data-pvc": self.data_pvc, "models-pvc": self.models_pvc}[name]


def _in(name: str) -> str:
    return "{{inputs.parameters.%s}}" % name


def _pass_through(names: Iterable[str] = PARAM_NAMES) -> dict[str, str]:
    """Task arguments that forward the caller's inputs unchanged."""
    return {n: _in(n) for n in names}


# A fanned-out task gets one pod group per item from ``lever stage X --list-units`` (a JSON list of
# comma-joined ``Unit.id`` strings such as "shard0-of8" or, with ``infer.units_per_pod`` > 1,
# "variantselector-shot1-shard0-of1,variantselector-shot2-shard0-of1") and runs it with
# ``--unit-id``: ids, never data, so Argo's parameter size cap is never near.
UNIT_PARAM = "unit-id"
UNIT_FLAG = "--unit-id"
LIST_FLAG = "--list-units"
PARTIAL_FLAG = "--partial"  # summarize on whatever inputs exist (the runner's run_partial)


def _stage_args(stage_name: str, *extra: str) -> list[str]:
    return [
        "stage", stage_name,
        "--plan", _in("plan"),
        "--profile", _in("profile"),
        "--store", _in("store"),
        "--run-id", _in("run-id"),
        OVERRIDES_FLAG, _in("overrides"),
        ROLE_FLAG, _in(ROLE),
        *extra,
    ]


def reads_provisioned_inputs(stage: Stage) -> bool:
    """Stages that read the dataset files or load a pretrained model (their output depends on
    ``data``, ``encoder`` or ``lvlm``) mount the data and model volumes; the others do not, so
    training and bookkeeping pods schedule without them."""
    return stage.provisioned or any(f.split(".")[0] in ("data", "encoder", "lvlm") for f in stage.config_fields)


def _container(
    platform: PlatformConfig,
    *,
    name: str,
    args: list[str],
    image_param: str,
    kind: str,
    stage: str,
    role: str,
    extra_inputs: tuple[str, ...] = (),
    verdict_step: bool = False,
    inputs_volumes: bool = False,
) -> Container:
    """One self-contained ``Container`` template running the ``lever`` CLI."""
    gpu = kind == "gpu"
    labels = {**PART_OF, pods.PLAN_LABEL: _in("plan"), pods.RUN_ID_LABEL: _in("run-id"),
              pods.STAGE_LABEL: stage, pods.ROLE_LABEL: role}
    if gpu:
        labels[pods.GPU_LABEL] = "true"
    return Container(
        name=name,
        image=_in(image_param),
        image_pull_policy="IfNotPresent",
        command=["lever"],
        args=args,
        inputs=[Parameter(name=n) for n in (*PARAM_NAMES, ROLE, *extra_inputs)],
        env=pods.env(platform, _in("pushgateway")),
        volumes=pods.volumes(platform, gpu=gpu, inputs=inputs_volumes, data_pvc=_in("data-pvc"),
                             models_pvc=_in("models-pvc")),
        resources=pods.resources(platform, kind),
        security_context=pods.container_security_context(),
        pod_security_context=pods.pod_security_context(platform),
        service_account_name=platform.service_account,
        node_selector=(dict(platform.node_selector) or None) if gpu else None,
        tolerations=pods.tolerations(platform) if gpu else None,
        retry_strategy=pods.retry_strategy(platform, verdict_step=verdict_step),
        labels=labels,
    )


def stage_template_name(stage: Stage) -> str:
    return f"stage-{stage.name}"


def list_template_name(stage: Stage) -> str:
    return f"list-{stage.name}"


def list_task_name(stage: Stage) -> str:
    return f"list-{stage.name}"


def _stage_templates(platform: PlatformConfig) -> list[Container]:
    out: list[Container] = []
    for st in STAGES:
        keys = (UNIT_PARAM,) if st.fanout != "none" else ()
        unit_args = [UNIT_FLAG, _in(UNIT_PARAM)] if keys else []
        out.append(_container(
            platform,
            name=stage_template_name(st),
            args=_stage_args(st.name, *unit_args),
            image_param="image" if st.gpu else ("slim-image" if st.name == SUMMARIZE_STAGE else "image"),
            kind="gpu" if st.gpu else "cpu",
            stage=st.name,
            role="stage",
            extra_inputs=keys,
            inputs_volumes=reads_provisioned_inputs(st),
        ))
        if st.fanout != "none":
            out.append(_container(
                platform,
                name=list_template_name(st),
                args=_stage_args(st.name, LIST_FLAG),
                image_param="slim-image",
                kind="small",
                stage=st.name,
                role="list-units",
            ))
    out.append(_container(
        platform,
        name=EXIT_HANDLER,
        args=_stage_args(SUMMARIZE_STAGE, PARTIAL_FLAG),
        image_param="slim-image",
        kind="cpu",
        stage=SUMMARIZE_STAGE,
        role="exit-handler",
    ))
    return out


def _pipeline_dag() -> DAG:
    """One task per stage; dependencies are the stage's inputs (plus its list task)."""
    names = (*PARAM_NAMES, ROLE)
    dag = DAG(name=PIPELINE, inputs=[Parameter(name=n) for n in PARAM_NAMES] + [Parameter(name=ROLE, default="plan")])
    with dag:
        for st in STAGES:
            deps = list(st.may_read())
            if st.fanout != "none":
                Task(name=list_task_name(st), template=list_template_name(st),
                     arguments=_pass_through(names), dependencies=deps or None)
                Task(name=st.name, template=stage_template_name(st),
                     arguments={**_pass_through(names), UNIT_PARAM: "{{item}}"},
                     with_param="{{tasks.%s.outputs.result}}" % list_task_name(st),
                     dependencies=[*deps, list_task_name(st)])
            else:
                Task(name=st.name, template=stage_template_name(st), arguments=_pass_through(names),
                     dependencies=deps or None)
    return dag


RUN_ID_EXPR_BARE = "workflow.parameters['run-id'] != '' ? workflow.parameters['run-id'] : workflow.name"
RUN_ID_EXPR = "{{=%s}}" % RUN_ID_EXPR_BARE


BASELINE_WHEN = ("{{=workflow.parameters.baseline != '%s' && "
                 "workflow.parameters.baseline != workflow.parameters.plan}}" % NO_BASELINE)


def _entry_dag() -> DAG:
    """Baseline plan's pipeline (skipped when not needed), then the plan's."""
    dag = DAG(name=ENTRYPOINT)
    with dag:
        args = {n: "{{workflow.parameters.%s}}" % n for n in PARAM_NAMES}
        args["run-id"] = RUN_ID_EXPR
        Task(name="baseline", template=PIPELINE,
             arguments={**args, "plan": "{{workflow.parameters.baseline}}", ROLE: "baseline"}, when=BASELINE_WHEN)
        Task(name=PIPELINE, template=PIPELINE, arguments={**args, ROLE: "plan"}, dependencies=["baseline"])
    return dag


def _exit_dag() -> DAG:
    """``onExit`` target: always runs the summarizer with ``--partial``.  After a
    successful run the summarize artifact is already committed, so this is a cheap store hit;
    after a failure it writes the partial report."""
    dag = DAG(name="exit-handler")
    with dag:
        args = {n: "{{workflow.parameters.%s}}" % n for n in PARAM_NAMES}
        args["run-id"] = RUN_ID_EXPR
        args[ROLE] = "plan"
        Task(name="summarize", template=EXIT_HANDLER, arguments=args)
    return dag


# Finished pods do not pile up: a succeeded pod is deleted at once (its outputs are in the store,
# its log in Argo's archive), a failed one stays for `lever logs` until the Workflow's TTL deletes
# the Workflow and, through the owner reference, its pods.
POD_GC_STRATEGY = "OnPodSuccess"
TTL_AFTER_COMPLETION_S = 7 * 24 * 3600


def workflow_spec_common(platform: PlatformConfig) -> dict[str, Any]:
    """Spec fields shared by the template and the nightly run."""
    return dict(
        service_account_name=platform.service_account,
        pod_gc=PodGC(strategy=POD_GC_STRATEGY),
        ttl_strategy=TTLStrategy(seconds_after_completion=TTL_AFTER_COMPLETION_S),
    )


def run_labels_from(plan_expr: str = "workflow.parameters.plan", run_id_expr: str = RUN_ID_EXPR_BARE) -> dict:
    """Workflow labels Argo's controller sets from expressions once the run starts
    (``workflowMetadata.labelsFrom``): the plan and the run id (the ``run-id`` parameter, else the
    workflow's generated name), so ``lever runs/status`` can select runs by either."""
    return {pods.PLAN_LABEL: LabelValueFrom(expression=plan_expr),
            pods.RUN_ID_LABEL: LabelValueFrom(expression=run_id_expr)}


def build_pipeline_template(platform: PlatformConfig, defaults: Optional[Defaults] = None) -> WorkflowTemplate:
    """The ``lever-pipeline`` WorkflowTemplate (installed once, by Helm or ``kubectl apply``)."""
    defaults = defaults or Defaults.from_platform(platform, plan="baseline")
    wt = WorkflowTemplate(
        name=TEMPLATE_NAME,
        labels=dict(PART_OF),
        annotations={"workflows.argoproj.io/description": "Lever plan pipeline generated from lever.pipeline.graph.STAGES"},
        entrypoint=ENTRYPOINT,
        on_exit="exit-handler",
        workflow_metadata=WorkflowMetadata(labels=dict(PART_OF), labels_from=run_labels_from()),
        arguments=[*(Parameter(name=n, value=defaults.value(n), description=d) for n, d in PARAMS),
                   Parameter(name=BASELINE_PARAM[0], value=DEFAULT_BASELINE, description=BASELINE_PARAM[1])],
        **workflow_spec_common(platform),
    )
    wt.templates = [*_stage_templates(platform), _pipeline_dag(), _entry_dag(), _exit_dag()]
    return wt


def build_plan_workflow(plan: PlanConfig, profile: str, base: PlatformConfig,
                        overrides: Sequence[str] = ()) -> Workflow:
    """A ``Workflow`` that runs ``plan`` through the installed template.  Only the arguments that
    differ from the template's defaults are written, so Helm values (image, store) still apply.
    ``overrides`` (already validated against the plan schema) travel as the ``overrides``
    parameter, a JSON list every stage pod applies with ``--overrides``."""
    from lever.config.loader import overrides_json

    args = {"plan": plan.name, "profile": profile}
    if overrides:
        args["overrides"] = overrides_json(overrides)
    baseline = plan.baseline_plan if plan.baseline_plan and plan.baseline_plan != plan.name else NO_BASELINE
    if baseline != DEFAULT_BASELINE:
        args["baseline"] = baseline
    mine = Defaults.from_platform(plan.platform, plan.name, profile)
    theirs = Defaults.from_platform(base, plan.name, profile)
    for n in ("image", "slim-image", "store", "pushgateway", "data-pvc", "models-pvc"):
        if mine.value(n) != theirs.value(n):
            args[n] = mine.value(n)
    return Workflow(
        generate_name=f"lever-{plan.name.replace('_', '-')}-",
        labels={**PART_OF, pods.PLAN_LABEL: plan.name},
        workflow_template_ref=WorkflowTemplateRef(name=TEMPLATE_NAME),
        arguments=[Parameter(name=k, value=v) for k, v in args.items()],
    )


MODELS_PULL_NAME = "lever-models-pull"
MODELS_PULL_PARAMS: tuple[tuple[str, str], ...] = (
    ("plan", "plan whose pretrained models to provision"),
    ("profile", "plan profile overlay"),
    ("slim-image", "CPU image running `lever models pull`"),
    ("overrides", "JSON list of KEY=VALUE config overrides (another model name or revision)"),
    ("models-pvc", "PersistentVolumeClaim the snapshots are written to (mounted read-write at /models)"),
    ("to", "models root to write: /models (the volume) or s3://bucket/prefix"),
)


def build_models_pull_template(platform: PlatformConfig, defaults: Optional[Defaults] = None) -> WorkflowTemplate:
    """The one-time provisioning job: ``lever models pull`` snapshots the plan's LVLM and encoder at
    their pinned revisions into the model volume (or S3).  The only pod allowed to reach the hub
    (no offline switch; an optional HF_TOKEN from ``platform.hf_secret``); re-running it is a
    no-op once the snapshots are there.  Submit: ``argo submit --from workflowtemplate/lever-models-pull``."""
    defaults = defaults or Defaults.from_platform(platform, plan="plan5")
    values = {"plan": defaults.plan, "profile": defaults.profile, "slim-image": defaults.slim_image,
              "overrides": defaults.overrides, "models-pvc": defaults.models_pvc, "to": pods.MODELS_MOUNT}
    names = tuple(n for n, _ in MODELS_PULL_PARAMS)
    pull = Container(
        name="pull",
        image=_in("slim-image"),
        image_pull_policy="IfNotPresent",
        command=["lever"],
        args=["models", "pull", "--plan", _in("plan"), "--profile", _in("profile"),
              OVERRIDES_FLAG, _in("overrides"), "--to", _in("to")],
        inputs=[Parameter(name=n) for n in names],
        env=pods.env(platform, "", offline=False),
        volumes=pods.volumes(platform, gpu=False, models_pvc=_in("models-pvc"), models_writable=True),
        resources=pods.resources(platform, "cpu"),
        security_context=pods.container_security_context(),
        pod_security_context=pods.pod_security_context(platform),
        service_account_name=platform.service_account,
        retry_strategy=pods.retry_strategy(platform),
        labels={**PART_OF, pods.PLAN_LABEL: _in("plan"), pods.RUN_ID_LABEL: "{{workflow.name}}",
                pods.STAGE_LABEL: "models-pull", pods.ROLE_LABEL: "models-pull"},
    )
    entry = DAG(name="main")
    with entry:
        Task(name="pull", template=pull.name, arguments={n: "{{workflow.parameters.%s}}" % n for n in names})
    wt = WorkflowTemplate(
        name=MODELS_PULL_NAME,
        labels=dict(PART_OF),
        annotations={"workflows.argoproj.io/description": "One-time: snapshot the plan's pretrained models "
                                                          "(pinned revisions) into the model volume"},
        entrypoint="main",
        workflow_metadata=WorkflowMetadata(labels=dict(PART_OF),
                                           labels_from=run_labels_from(run_id_expr="workflow.name")),
        arguments=[Parameter(name=n, value=values[n], description=d) for n, d in MODELS_PULL_PARAMS],
        **workflow_spec_common(platform),
    )
    wt.templates = [pull, entry]
    return wt
