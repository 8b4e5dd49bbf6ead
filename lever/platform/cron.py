"""The nightly regression CronWorkflow.

Each night: run the baseline plan, then the recommended plan (its summarizer compares against the
baseline's inference outputs, so the baseline goes first; with content addressing an unchanged
baseline is a store hit), then ``lever regress``, which exits non-zero -- failing the workflow --
when a shot regressed beyond the margin, and pushes the ``lever_nightly_regression`` gauge the
alert rule watches.  The pipeline is called through ``templateRef`` so the installed
``lever-pipeline`` template stays the single definition of the stages.
"""

from __future__ import annotations

from hera.workflows import DAG, Container, CronWorkflow, Parameter, Task
from hera.workflows.models import TemplateRef, WorkflowMetadata

from lever.config.schema import PlatformConfig
from lever.platform import pods
from lever.platform.workflows import (
    EXIT_HANDLER,
    OVERRIDES_FLAG,
    PARAM_NAMES,
    PART_OF,
    PIPELINE,
    ROLE,
    TEMPLATE_NAME,
    Defaults,
    run_labels_from,
    workflow_spec_common,
)

CRON_NAME = "lever-nightly"
STARTING_DEADLINE_SECONDS = 3600  # a run missed by more than an hour waits for the next night


def _regress_template(platform: PlatformConfig) -> Container:
    args = [
        "regress",
        "--plan", "{{inputs.parameters.plan}}",
        "--baseline", "{{inputs.parameters.baseline}}",
        "--margin", "{{inputs.parameters.margin}}",
        "--profile", "{{inputs.parameters.profile}}",
        "--store", "{{inputs.parameters.store}}",
        "--run-id", "{{inputs.parameters.run-id}}",
        "--pushgateway", "{{inputs.parameters.pushgateway}}",
        OVERRIDES_FLAG, "{{inputs.parameters.overrides}}",
    ]
    return pods.lever_cpu_container(
        platform, name="regress", image="{{inputs.parameters.slim-image}}", args=args,
        pushgateway="{{inputs.parameters.pushgateway}}", size="small", verdict_step=True,
        inputs=[Parameter(name=n) for n in ("plan", "baseline", "margin", "profile", "store", "run-id",
                                              "pushgateway", "slim-image", "overrides")],
        labels={**PART_OF, pods.PLAN_LABEL: "{{inputs.parameters.plan}}", pods.RUN_ID_LABEL: "{{inputs.parameters.run-id}}",
                pods.STAGE_LABEL: "regress", pods.ROLE_LABEL: "regress"},
    )


def nightly_schedule(platform: PlatformConfig) -> dict:
    """When and how the nightly runs, shared by the plan-vs-baseline cron and a campaign's: never two
    at once (``Forbid``), a missed start dropped after the deadline, a week of successes and two of
    failures kept for inspection."""
    return dict(schedules=[platform.nightly_schedule], timezone=platform.nightly_timezone,
                concurrency_policy="Forbid", starting_deadline_seconds=STARTING_DEADLINE_SECONDS,
                successful_jobs_history_limit=7, failed_jobs_history_limit=14)


def _pipeline_args(plan_expr: str, role: str = "plan") -> dict[str, str]:
    args = {n: "{{workflow.parameters.%s}}" % n for n in PARAM_NAMES if n != "run-id"}
    args["plan"] = plan_expr
    args["run-id"] = "{{workflow.name}}"
    args[ROLE] = role
    return args


def build_nightly_cron(platform: PlatformConfig, plan: str, baseline: str, margin: float) -> CronWorkflow:
    d = Defaults.from_platform(platform, plan)
    params = [
        Parameter(name="plan", value=plan, description="the recommended plan"),
        Parameter(name="baseline", value=baseline, description="plan it must not fall behind"),
        Parameter(name="margin", value=f"{margin:g}", description="accuracy points; see docs/kubernetes.md"),
        *[Parameter(name=n, value=d.value(n)) for n in PARAM_NAMES if n not in ("plan", "run-id")],
    ]
    ref = TemplateRef(name=TEMPLATE_NAME, template=PIPELINE)
    cron = CronWorkflow(
        name=CRON_NAME,
        labels=dict(PART_OF),
        **nightly_schedule(platform),
        entrypoint="nightly",
        on_exit="nightly-exit",
        arguments=params,
        workflow_metadata=WorkflowMetadata(labels={**PART_OF, pods.NIGHTLY_LABEL: "true"},
                                           labels_from=run_labels_from(run_id_expr="workflow.name")),
        **workflow_spec_common(platform),
    )
    regress = _regress_template(platform)
    nightly = DAG(name="nightly")
    with nightly:
        Task(name="baseline", template_ref=ref,
             arguments=_pipeline_args("{{workflow.parameters.baseline}}", role="baseline"))
        Task(name="candidate", template_ref=ref, arguments=_pipeline_args("{{workflow.parameters.plan}}"),
             dependencies=["baseline"])
        Task(name="regress", template=regress.name, dependencies=["candidate"], arguments={
            "plan": "{{workflow.parameters.plan}}",
            "baseline": "{{workflow.parameters.baseline}}",
            "margin": "{{workflow.parameters.margin}}",
            "profile": "{{workflow.parameters.profile}}",
            "store": "{{workflow.parameters.store}}",
            "run-id": "{{workflow.name}}",
            "pushgateway": "{{workflow.parameters.pushgateway}}",
            "slim-image": "{{workflow.parameters.slim-image}}",
            "overrides": "{{workflow.parameters.overrides}}",
        })
    exit_dag = DAG(name="nightly-exit")
    with exit_dag:
        # a partial report for whichever plan got furthest is still worth having on failure
        Task(name="summarize", template_ref=TemplateRef(name=TEMPLATE_NAME, template=EXIT_HANDLER),
             arguments=_pipeline_args("{{workflow.parameters.plan}}"))
    cron.templates = [nightly, exit_dag, regress]
    return cron
