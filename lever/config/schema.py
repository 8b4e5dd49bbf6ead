"""Typed plan configuration.

Every section forbids unknown keys so that a typo in a plan YAML fails loudly instead of being
silently ignored (the seeds lost runs to misspelled environment variables).  Defaults here mirror
the researchers' ``train_v3.sh``; the shipped ``defaults.yaml`` restates them explicitly so that a
plan file reads as a diff against it.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticSpec(Section):
    """Size of the generated OKVQA-format dataset used by the tiny profile and the tests."""

    n_train: int = Field(160, ge=4)
    n_val: int = Field(48, ge=1)
    image_size: int = Field(64, ge=16)
    seed: int = 0
    planted_fraction: float = Field(
        0.0, ge=0.0, le=0.9,
        description="share of questions that are the planted 'code word' task, answerable only by copying "
        "from a demonstration whose shapes have the query's colour (lever.data.synthetic); 0 turns it off",
    )
    planted_noise: float = Field(
        0.15, ge=0.0, lt=0.5,
        description="share of planted questions whose annotators agree on another code word (label noise): "
        "one demonstration of the query's colour is then weaker evidence than several",
    )


class DataConfig(Section):
    dataset: Literal["okvqa", "vqav2", "synthetic"] = "okvqa"
    root: str = Field(
        "data/okvqa",
        description="folder with the official question/annotation files and COCO image folders, as this "
        "process mounts it (cluster: the read-only data volume, /data/okvqa); images are recorded relative to it",
    )
    train_questions: str = "OpenEnded_mscoco_train2014_questions.json"
    train_annotations: str = "mscoco_train2014_annotations.json"
    train_images: str = "train2014"
    val_questions: str = "OpenEnded_mscoco_val2014_questions.json"
    val_annotations: str = "mscoco_val2014_annotations.json"
    val_images: str = "val2014"
    max_train: Optional[int] = Field(None, ge=1, description="cap on the train split (first N in recorded order)")
    max_val: Optional[int] = Field(None, ge=1)
    synthetic: SyntheticSpec = SyntheticSpec()

    @field_validator("root")
    @classmethod
    def _local_root(cls, root: str) -> str:
        if "://" in root:
            raise ValueError(f"{root!r}: the dataset is read from a mounted folder (the cluster's read-only "
                             "data volume), not a URL; copy it there once (docs/kubernetes.md, Provisioning)")
        return root


class EncoderConfig(Section):
    kind: Literal["clip", "tiny_clip"] = "clip"
    name: str = Field(
        "openai/clip-vit-base-patch32",
        description="clip: a hub id (resolved under models.root or the Hugging Face cache), a local directory "
        "in the hub layout, or an s3:// URL of a snapshot written by `lever models pull`",
    )
    revision: Optional[str] = Field(
        None,
        description="clip with a hub id: the pinned hub commit; part of the embeddings' key, and the snapshot "
        "directory `lever models pull` writes and the stages read",
    )
    hidden_size: int = Field(32, ge=4, description="tiny_clip only")
    projection_dim: int = Field(32, ge=4, description="tiny_clip only")
    batch_size: int = Field(64, ge=1)
    seed: int = 0


class SamplerConfig(Section):
    kind: Literal["random", "image_sim", "text_sim", "mix"] = "random"
    pool_size: int = Field(64, ge=1, description="K: candidate pool per query")
    mix_image_fraction: float = Field(0.5, ge=0.0, le=1.0, description="mix: share of the pool by image similarity")


class LVLMConfig(Section):
    kind: Literal["qwen2_5_vl", "tiny_qwen2_5_vl"] = "qwen2_5_vl"
    name: str = Field(
        "Qwen/Qwen2.5-VL-3B-Instruct",
        description="qwen2_5_vl: a hub id (resolved under models.root or the Hugging Face cache), a local "
        "directory in the hub layout, or an s3:// URL of a snapshot written by `lever models pull`",
    )
    revision: Optional[str] = Field(
        None,
        description="qwen2_5_vl with a hub id: the pinned hub commit; part of the key of every unit that uses "
        "the LVLM, and the snapshot directory `lever models pull` writes and the stages read",
    )
    short_name: str = "qwen2.5_vl_3B"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(5, ge=1)
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448
    fast: bool = Field(True, description="use the cached/batched scoring path (the plain path stays as reference)")
    seed: int = 0
    image_cache_mb: float = Field(
        2048.0, gt=0, json_schema_extra={"in_key": False},
        description="host memory the processed-image cache may hold, in MiB (pixels are kept in the model "
        "dtype); least recently used images are dropped beyond it. Not part of any artifact key",
    )
    warmup_steps: int = Field(
        300, ge=0,
        description="tiny_qwen2_5_vl only: seeded warm-up fine-tune steps on synthetic QA (cached on disk) "
        "so some answers are right and rewards vary; 0 keeps the random weights",
    )


class ModelsConfig(Section):
    """Where provisioned model snapshots live (``lever models pull`` writes them there)."""

    root: Optional[str] = Field(
        None,
        description="directory (a model volume, e.g. /models) or s3://bucket/prefix holding "
        "<org>--<name>/<revision>/ snapshots; None: hub ids resolve in the Hugging Face cache only. "
        "Not part of any artifact key: where a pinned snapshot is read from does not change it",
    )


class BeamConfig(Section):
    beam_size: int = Field(5, ge=1, description="B")
    shots: int = Field(2, ge=1, le=8, description="S: length of InfoScore beams")
    num_queries: Optional[int] = Field(None, ge=1, description="train queries to build beams for (None: all)")
    shards: int = Field(1, ge=1)


class SourceCount(Section):
    enabled: bool = True
    count: int = Field(2, ge=0)


class SampleSource(Section):
    enabled: bool = True
    temperatures: list[float] = [1.0, 1.3]
    per_temperature: int = Field(2, ge=0)


class RLSources(Section):
    infoscore_beam: SourceCount = SourceCount(enabled=True, count=5)
    v2_beam: SourceCount = SourceCount(enabled=True, count=5)
    v2_sample: SampleSource = SampleSource()
    retrieval: SourceCount = SourceCount(enabled=True, count=2)
    random: SourceCount = SourceCount(enabled=True, count=2)


class BalancedConfig(Section):
    """The seeds' "balanced K=64" data: keep adding sequences until groups hold both outcomes."""

    enabled: bool = False
    target_mixed_fraction: float = Field(0.8, ge=0.0, le=1.0)
    max_extra_per_query: int = Field(16, ge=0)


class RLDataConfig(Section):
    shots: int = Field(2, ge=1, le=8, description="length of RL candidate sequences")
    num_queries: Optional[int] = Field(None, ge=1)
    shards: int = Field(1, ge=1)
    sources: RLSources = RLSources()
    balanced: BalancedConfig = BalancedConfig()
    variable_group_size: bool = Field(False, description="keep groups of whatever size the sources give (the seeds' k64 v3 data)")


class SelectorConfig(Section):
    arch: Literal["pointer"] = "pointer"
    hidden: int = Field(256, ge=4)
    layers: int = Field(1, ge=0)
    heads: int = Field(1, ge=1)
    temperature: float = Field(0.1, gt=0)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    init: Literal["default", "siamese"] = Field(
        "default",
        description="default: PyTorch's initialisation (an untrained selector ranks candidates at random); "
        "siamese: query and candidate projections start equal (orthogonal), the scoring layers as the identity "
        "and the cross-attention branches at zero, so an untrained selector ranks by embedding cosine "
        "(retrieval) and training starts from there",
    )


class V2TrainConfig(Section):
    epochs: int = Field(10, ge=0)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    score_threshold: Optional[float] = Field(None, description="drop beams scoring below this InfoScore")
    weight_decay: float = 1e-3


class LeverLMConfig(Section):
    enabled: bool = False
    layers: int = 2
    hidden: int = 128
    heads: int = 2
    epochs: int = 10
    lr: float = 1e-4


class RewardConfig(Section):
    mode: Literal["hard_plus_soft", "separated", "hard_plus_gtprob_plus_rel", "legacy"] = "hard_plus_soft"
    hard_weight: float = 1.0
    soft_weight: float = 1.0
    rel_weight: float = 0.1
    alpha: float = 0.5
    beta: float = 0.8
    negate: bool = Field(
        False,
        description="ablation only: train on the negated reward, a deliberately harmful signal; a run with it "
        "must end below the baseline (the testbed's check that the evaluation can see a broken trainer)",
    )


class RCEConfig(Section):
    epochs: int = Field(5, ge=0)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    tau_start: float = Field(2.0, gt=0)
    tau_end: float = Field(0.5, gt=0)
    normalized_reward: bool = False
    weight_decay: float = 1e-3


class AdaptiveBeta(Section):
    enabled: bool = False
    kl_low: float = 0.01
    kl_high: float = 0.1
    factor: float = Field(1.5, gt=1.0)


class CurriculumConfig(Section):
    """plan9: phase 1 on high+medium quality queries, phase 2 on all, from phase 1's best."""

    enabled: bool = False
    phase1_epochs: int = 30
    phase2_epochs: int = 20
    high_gap: float = 1.5
    high_min_each: int = 3
    medium_gap: float = 1.0
    medium_min_each: int = 2


class OnlineRolloutConfig(Section):
    """On-policy rollouts (``grpo.rollout: online``): the selector samples its own groups and the
    LVLM judges them during training (lever.rl.online)."""

    group_size: int = Field(
        8, ge=2,
        description="G: sequences sampled from the current selector per training query and round; duplicates "
        "are kept (they are draws of the policy; a repeated sequence is judged once, through the cache)",
    )
    temperature: float = Field(
        1.0, gt=0,
        description="sampling temperature of the rollouts (1.0: the policy itself, so the PPO old policy "
        "is exactly the sampling distribution)",
    )
    queries_per_epoch: Optional[int] = Field(
        None, ge=1,
        description="training queries sampled (without replacement, seeded) per epoch; None: every train "
        "query once per epoch",
    )
    offline_fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="share of each query's offline RL-data candidates (judged by generate-rl-data) mixed into "
        "its sampled group every round; 0: purely on-policy",
    )
    eval_queries: Optional[int] = Field(
        None, ge=1,
        description="held-out (validation) queries whose own samples are judged after every epoch for "
        "heldout_reward; None: every validation query",
    )
    eval_samples: int = Field(
        4, ge=1,
        description="samples per held-out query for heldout_reward (drawn with a generator seeded by "
        "(seed, epoch), so every epoch and a resumed run draw the same way)",
    )


class GRPOConfig(Section):
    epochs: int = Field(0, ge=0)
    rollout: Literal["offline", "online"] = Field(
        "offline",
        description="offline: GRPO over the fixed, pre-judged RL-data groups; online: each round the selector "
        "samples its own groups and the LVLM judges them (a GPU stage that loads the LVLM)",
    )
    online: OnlineRolloutConfig = Field(
        OnlineRolloutConfig(), description="settings of online rollouts (used only with rollout: online)"
    )
    lr: float = Field(5e-6, gt=0)
    batch_size: int = Field(8, ge=1)
    updates_per_round: int = Field(1, ge=1, description="policy updates per old-policy refresh")
    kl_beta: float = Field(0.15, ge=0)
    rank_advantage: bool = True
    min_std: float = Field(0.1, gt=0)
    adv_clip: float = Field(5.0, gt=0)
    clip_eps: float = Field(0.2, gt=0, lt=1)
    log_ratio_clamp: float = Field(20.0, gt=0)
    # "exact": KL over the pointer's full candidate distributions.  k3 is an unbiased estimate only
    # for on-policy samples; GRPO here scores off-policy group candidates (beams, retrieval,
    # random), where k3 explodes (1e13 vs an exact KL of 2 on the tiny data) and hurt held-out
    # reward.  Both are always reported; set "k3" to reproduce the reference trainer.
    kl_estimator: Literal["k3", "exact"] = "exact"
    reference: Literal["rce", "v2", "none"] = "rce"
    adaptive_beta: AdaptiveBeta = AdaptiveBeta()
    freeze_backbone: bool = True
    require_positive: bool = False
    curriculum: CurriculumConfig = CurriculumConfig()
    grad_clip: float = 1.0

    @model_validator(mode="after")
    def _online_supported(self) -> "GRPOConfig":
        if self.rollout == "online" and self.curriculum.enabled:
            raise ValueError("grpo.rollout 'online' does not combine with grpo.curriculum (its buckets are "
                             "built from the offline groups); turn one off")
        return self


class ValidationConfig(Section):
    val_fraction: float = Field(0.2, gt=0, lt=1)


class CheckpointConfig(Section):
    strategy: Literal["val_loss", "val_reward", "heldout_reward", "last", "epoch"] = Field(
        "last",
        description="val_loss (lowest), val_reward (highest), heldout_reward (highest reward of the policy's own "
        "judged samples on held-out queries: online GRPO only, RCE epochs fall back to the last), the last epoch, "
        "or a fixed epoch",
    )
    epoch: Optional[int] = Field(None, ge=1)
    # GRPO epochs evaluated beside the chosen checkpoint (inference variants ``epoch{N}``, report
    # rows ``epoch{N}``); epochs past the plan's GRPO epoch count are not evaluated (see
    # lever.pipeline.graph.evaluated_epochs)
    evaluate_epochs: list[int] = []

    @model_validator(mode="after")
    def _epoch_needed(self) -> "CheckpointConfig":
        if self.strategy == "epoch" and self.epoch is None:
            raise ValueError("strategy 'epoch' needs 'epoch' set")
        if any(e < 1 for e in self.evaluate_epochs):
            raise ValueError(f"evaluate_epochs must be epoch numbers >= 1, got {self.evaluate_epochs}")
        if len(set(self.evaluate_epochs)) != len(self.evaluate_epochs):
            raise ValueError(f"evaluate_epochs lists an epoch twice: {self.evaluate_epochs}")
        return self


class InferConfig(Section):
    split: Literal["val", "train"] = "val"
    num_samples: int = Field(800, ge=1)
    shots: list[int] = [1, 2, 3, 4]
    shards: int = Field(1, ge=1)
    units_per_pod: int = Field(
        1, ge=1,
        description="inference units (variant x shot x shard) one Argo pod runs in a row with one model load; "
        "the cluster profile's value comes from `python -m lever.models.cost_model` (load vs compute per pod). "
        "Not part of any key",
    )
    pool: Literal["train", "retrieved"] = "train"
    retrieve_top_n: int = Field(64, ge=1)
    baselines: list[Literal["random", "retrieval", "v2", "oracle"]] = Field(
        ["random", "retrieval"],
        description="reference variants evaluated beside the plan's selector: random ICDs, CLIP image "
        "retrieval, the v2 selector, and (synthetic data only) the oracle that knows the planted attribute",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _shots_positive(self) -> "InferConfig":
        if not self.shots or any(s < 1 for s in self.shots):
            raise ValueError("shots must be a non-empty list of positive integers")
        return self


#: how a per-shot plan-vs-baseline difference is judged a regression (lever.report.regression)
RegressionRule = Literal["strict", "significant"]


class AlertConfig(Section):
    kl_max: float = 5.0
    kl_growth_per_epoch: float = 2.0
    adv_std_floor: float = 0.01
    adv_std_epochs: int = 3
    val_loss_rising_epochs: int = 5
    stalled_minutes: int = 30
    regression_margin: float = 1.5
    # strict: the CI's upper bound is below -margin; significant: diff < -margin and the CI
    # excludes 0.  One rule for `lever regress`, the report's verdict and the nightly alert.
    regression_rule: RegressionRule = "strict"
    guard: Literal["off", "warn", "stop", "rollback"] = "warn"
    # Prometheus side only (lever.obs.alerts): how long a condition must hold before an alert
    # fires, and how long after a run's last push its alerts still count (Pushgateway keeps
    # finished runs' groups forever; without this, one diverged run would alert for ever).
    for_minutes: float = Field(1.0, ge=0)
    retention_hours: float = Field(24.0, gt=0)


class ReportConfig(Section):
    bootstrap_samples: int = Field(2000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    references: list[str] = []


class PlatformConfig(Section):
    image: str = "ghcr.io/lever-ml/lever:0.1.0"
    slim_image: str = "ghcr.io/lever-ml/lever-slim:0.1.0"
    namespace: str = "lever"
    gpu_per_pod: int = 1
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, str]] = []
    service_account: str = "lever"
    # Added for the Argo renderer (lever.platform); defaults describe a typical GPU cluster.
    store: str = Field("s3://lever-artifacts/lever", description="artifact store URL the pods use")
    s3_secret: str = Field("lever-s3", description="Secret holding AWS_* keys; referenced, never created")
    data_pvc: str = Field(
        "okvqa-data",
        description="PersistentVolumeClaim (ReadOnlyMany) holding the datasets, mounted read-only at /data in "
        "every stage pod (data.root /data/okvqa = the volume's okvqa/ folder); a workflow parameter",
    )
    models_pvc: str = Field(
        "lever-models",
        description="PersistentVolumeClaim holding the model snapshots `lever models pull` writes, mounted "
        "read-only at /models in stage pods (models.root) and read-write in the models-pull job",
    )
    hf_secret: str = Field(
        "lever-hf",
        description="optional Secret with HF_TOKEN for the models-pull job (gated models only); referenced, "
        "never created",
    )
    pushgateway_url: str = "http://prometheus-pushgateway.monitoring.svc:9091"
    run_as_user: int = Field(10001, ge=1, description="numeric non-root UID of every pod (matches the images)")
    gpu_cpu: str = "8"
    gpu_memory: str = "64Gi"
    cpu_cpu: str = "2"
    cpu_memory: str = "8Gi"
    shm_size: str = "16Gi"
    cache_size: str = "100Gi"
    retry_limit: int = Field(3, ge=0)
    retry_backoff: str = "1m"
    retry_factor: int = Field(2, ge=1)
    retry_max_duration: str = "2h"
    nightly_schedule: str = "0 2 * * *"
    nightly_timezone: str = "Etc/UTC"


class PlanConfig(Section):
    name: str
    description: str = ""
    extends: Optional[str] = None
    profile: Optional[str] = None
    seed: int = 42
    recommended: bool = False
    data: DataConfig = DataConfig()
    encoder: EncoderConfig = EncoderConfig()
    sampler: SamplerConfig = SamplerConfig()
    lvlm: LVLMConfig = LVLMConfig()
    models: ModelsConfig = ModelsConfig()
    beam: BeamConfig = BeamConfig()
    rl_data: RLDataConfig = RLDataConfig()
    selector: SelectorConfig = SelectorConfig()
    v2: V2TrainConfig = V2TrainConfig()
    lever_lm: LeverLMConfig = LeverLMConfig()
    reward: RewardConfig = RewardConfig()
    rce: RCEConfig = RCEConfig()
    grpo: GRPOConfig = GRPOConfig()
    validation: ValidationConfig = ValidationConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    infer: InferConfig = InferConfig()
    alerts: AlertConfig = AlertConfig()
    report: ReportConfig = ReportConfig()
    platform: PlatformConfig = PlatformConfig()
    selector_source: Literal["v3", "v2"] = Field(
        "v3", description="v3: RCE(+GRPO) checkpoint; v2: the supervised pointer selector alone"
    )
    baseline_plan: Optional[str] = Field("baseline", description="plan whose results the report compares against")

    @model_validator(mode="after")
    def _cross_checks(self) -> "PlanConfig":
        if self.sampler.pool_size < self.beam.shots:
            raise ValueError(
                f"sampler.pool_size={self.sampler.pool_size} is smaller than beam.shots={self.beam.shots}"
            )
        if self.sampler.pool_size < self.rl_data.shots:
            raise ValueError(
                f"sampler.pool_size={self.sampler.pool_size} is smaller than rl_data.shots={self.rl_data.shots}"
            )
        if self.infer.pool == "retrieved" and self.infer.retrieve_top_n < max(self.infer.shots):
            raise ValueError(
                f"infer.retrieve_top_n={self.infer.retrieve_top_n} cannot give {max(self.infer.shots)} shots"
            )
        return self
