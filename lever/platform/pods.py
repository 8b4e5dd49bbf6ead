"""Pod-level building blocks shared by every Lever Argo template.

Every container template is made self-contained (its own volumes, pod security context, service
account and retry strategy) instead of relying on workflow-level settings, because the nightly
CronWorkflow calls the pipeline through ``templateRef`` and a ``templateRef`` brings only the
template, not the WorkflowTemplate's spec-level volumes or security settings.
"""

from __future__ import annotations

from hera.workflows import Container, EmptyDirVolume, Env, ExistingVolume, Resources, RetryStrategy, SecretEnv
from hera.workflows.models import (
    Backoff,
    Capabilities,
    PodSecurityContext,
    SeccompProfile,
    SecurityContext,
    Toleration,
)

from lever.config.schema import PlatformConfig

# Exit code the CLI uses for user/code errors (bad plan, bad input, StageError): never retried.
USER_ERROR_EXIT_CODE = 2

# Retry when the attempt ended in an Argo "Error" (pod deleted, evicted, node lost, init/wait
# container failure) or "Failed" with any exit code but the user-error one (OOMKilled = 137,
# a crashed CUDA driver, a network blip reaching S3).  Exit codes are compared as strings
# because ``lastRetry.exitCode`` is a string and may be empty for Error nodes, where
# ``asInt`` would make the expression itself fail.
RETRY_EXPRESSION = (
    'lastRetry.status == "Error" || '
    f'(lastRetry.status == "Failed" && lastRetry.exitCode != "{USER_ERROR_EXIT_CODE}")'
)
# For steps whose non-zero exit is a verdict (``lever regress``: 1 = regression found),
# only infrastructure errors are retried.
ERROR_ONLY_EXPRESSION = 'lastRetry.status == "Error"'

# The label contract (docs/kubernetes.md, "Labels"): `lever status/logs/runs/delete` select on
# these.  Workflows carry PLAN_LABEL and RUN_ID_LABEL; every pod carries those two and STAGE_LABEL.
PLAN_LABEL = "lever.dev/plan"
RUN_ID_LABEL = "lever.dev/run-id"
GPU_LABEL = "lever.dev/gpu"
STAGE_LABEL = "lever.dev/stage"
ROLE_LABEL = "lever.dev/role"
NIGHTLY_LABEL = "lever.dev/nightly"

# Keys of the S3 Secret and whether a pod may start without them (endpoint and region are
# optional: plain AWS needs neither an endpoint nor, with a default region, the region).
S3_SECRET_KEYS: tuple[tuple[str, bool], ...] = (
    ("AWS_ACCESS_KEY_ID", False),
    ("AWS_SECRET_ACCESS_KEY", False),
    ("AWS_ENDPOINT_URL", True),
    ("AWS_REGION", True),
)

TMP_MOUNT = "/tmp"
CACHE_MOUNT = "/cache"
SHM_MOUNT = "/dev/shm"
# provisioned inputs (docs/kubernetes.md): the datasets volume and the model snapshots volume;
# the cluster profile's data.root (/data/okvqa) and models.root (/models) point into them
DATA_MOUNT = "/data"
MODELS_MOUNT = "/models"
DATA_VOLUME = "data"
MODELS_VOLUME = "models"


def retry_strategy(platform: PlatformConfig, *, verdict_step: bool = False) -> RetryStrategy:
    """Backoff retries for infrastructure failures only (see ``RETRY_EXPRESSION``).

    ``retryPolicy: Always`` lets the expression decide: ``OnError`` alone would skip OOM kills
    and other non-zero exits that Kubernetes reports as a *failed* main container.
    """
    return RetryStrategy(
        limit=str(platform.retry_limit),
        retry_policy="Always",
        expression=ERROR_ONLY_EXPRESSION if verdict_step else RETRY_EXPRESSION,
        backoff=Backoff(
            duration=platform.retry_backoff,
            factor=str(platform.retry_factor),
            max_duration=platform.retry_max_duration,
        ),
    )


def pod_security_context(platform: PlatformConfig) -> PodSecurityContext:
    """Numeric non-root user matching the images' ``USER``; fsGroup makes emptyDirs writable."""
    uid = platform.run_as_user
    return PodSecurityContext(
        run_as_non_root=True,
        run_as_user=uid,
        run_as_group=uid,
        fs_group=uid,
        seccomp_profile=SeccompProfile(type="RuntimeDefault"),
    )


def container_security_context() -> SecurityContext:
    """Read-only root filesystem: every write goes to /tmp, /cache or the S3 store."""
    return SecurityContext(
        run_as_non_root=True,
        read_only_root_filesystem=True,
        allow_privilege_escalation=False,
        capabilities=Capabilities(drop=["ALL"]),
    )


def volumes(platform: PlatformConfig, *, gpu: bool, inputs: bool = False, data_pvc: str = "",
            models_pvc: str = "", models_writable: bool = False) -> list:
    """Scratch space for the read-only root filesystem; GPU pods also get a RAM-backed /dev/shm
    (the 64 MiB container default starves PyTorch DataLoader workers and NCCL).  ``inputs`` adds
    the datasets volume (read-only at /data) and the model snapshots volume (read-only at /models,
    read-write for the models-pull job); claim names are workflow parameters, so one template
    serves any install."""
    vols: list = [
        EmptyDirVolume(name="tmp", mount_path=TMP_MOUNT),
        EmptyDirVolume(name="cache", mount_path=CACHE_MOUNT, size_limit=platform.cache_size),
    ]
    if gpu:
        vols.append(EmptyDirVolume(name="dshm", mount_path=SHM_MOUNT, medium="Memory", size_limit=platform.shm_size))
    if inputs and data_pvc:
        vols.append(ExistingVolume(name=DATA_VOLUME, claim_name=data_pvc, mount_path=DATA_MOUNT, read_only=True))
    if (inputs or models_writable) and models_pvc:
        vols.append(ExistingVolume(name=MODELS_VOLUME, claim_name=models_pvc, mount_path=MODELS_MOUNT,
                                   read_only=not models_writable))
    return vols


def env(platform: PlatformConfig, pushgateway: str, *, offline: bool = True) -> list[Env | SecretEnv]:
    """S3 credentials by reference to the Secret (never values), paths that keep every library's
    cache on the writable mounts, and (``offline``, every pod but models-pull) the Hugging Face
    offline switches: a pod never downloads a model, it reads the provisioned snapshot or fails
    with exit 2 naming what to pull."""
    out: list[Env | SecretEnv] = [
        SecretEnv(name=key, secret_name=platform.s3_secret, secret_key=key, optional=True if optional else None)
        for key, optional in S3_SECRET_KEYS
    ]
    if offline:
        out += [Env(name="HF_HUB_OFFLINE", value="1"), Env(name="TRANSFORMERS_OFFLINE", value="1")]
    else:
        out.append(SecretEnv(name="HF_TOKEN", secret_name=platform.hf_secret, secret_key="HF_TOKEN", optional=True))
    out += [Env(name="HF_HUB_DISABLE_TELEMETRY", value="1")]
    out += [Env(name="LEVER_PUSHGATEWAY_URL", value=pushgateway)] if pushgateway else []
    out += [
        Env(name="HOME", value=TMP_MOUNT),
        Env(name="XDG_CACHE_HOME", value=CACHE_MOUNT),
        Env(name="LEVER_CACHE_DIR", value=f"{CACHE_MOUNT}/lever"),
        Env(name="HF_HOME", value=f"{CACHE_MOUNT}/huggingface"),
        Env(name="TORCH_HOME", value=f"{CACHE_MOUNT}/torch"),
        Env(name="MPLCONFIGDIR", value=f"{TMP_MOUNT}/matplotlib"),
        Env(name="PYTHONUNBUFFERED", value="1"),
        Env(name="PYTHONDONTWRITEBYTECODE", value="1"),
    ]
    return out


def resources(platform: PlatformConfig, kind: str) -> Resources:
    """``kind``: ``gpu`` (stage on a GPU), ``cpu`` (CPU stage) or ``small`` (list units)."""
    if kind == "gpu":
        return Resources(
            cpu_request=platform.gpu_cpu,
            memory_request=platform.gpu_memory,
            memory_limit=platform.gpu_memory,
            gpus=platform.gpu_per_pod,
        )
    if kind == "cpu":
        return Resources(cpu_request=platform.cpu_cpu, memory_request=platform.cpu_memory, memory_limit=platform.cpu_memory)
    return Resources(cpu_request="100m", memory_request="512Mi", memory_limit="1Gi")


def tolerations(platform: PlatformConfig) -> list[Toleration] | None:
    if not platform.tolerations:
        return None
    return [Toleration(**t) for t in platform.tolerations]


def lever_cpu_container(platform: PlatformConfig, *, name: str, image: str, args: list[str], pushgateway: str,
                        size: str, labels: dict[str, str], verdict_step: bool, **extra) -> Container:
    """A CPU pod running one ``lever`` command with the platform's pod policy (env, volumes,
    security contexts, service account, retries): the nightly regress step and a campaign's
    leaderboard step differ only in their command, inputs and labels."""
    return Container(
        name=name,
        image=image,
        image_pull_policy="IfNotPresent",
        command=["lever"],
        args=args,
        env=env(platform, pushgateway),
        volumes=volumes(platform, gpu=False),
        resources=resources(platform, size),
        security_context=container_security_context(),
        pod_security_context=pod_security_context(platform),
        service_account_name=platform.service_account,
        retry_strategy=retry_strategy(platform, verdict_step=verdict_step),
        labels=labels,
        **extra,
    )
