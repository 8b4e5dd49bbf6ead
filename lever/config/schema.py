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

    n_train: int = Field(
        160, ge=4,
        description="questions generated for the train split (the pool ICDs are picked from); raise it for a "
        "harder, larger tiny run",
    )
    n_val: int = Field(48, ge=1, description="questions generated for the validation split (the evaluation queries)")
    image_size: int = Field(
        64, ge=16,
        description="side of the generated square images in pixels; small keeps the tiny LVLM fast on CPU",
    )
    seed: int = Field(
        0,
        description="seed of the generated questions, images and answers; another seed gives another dataset (and"
        " new keys downstream)",
    )
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
    dataset: Literal["okvqa", "vqav2", "synthetic"] = Field(
        "okvqa",
        description="okvqa / vqav2: the official files under root; synthetic: generate a small OKVQA-format set "
        "(data.synthetic) so a plan runs without downloaded data (the tiny profile and the tests)",
    )
    root: str = Field(
        "data/okvqa",
        description="folder with the official question/annotation files and COCO image folders, as this "
        "process mounts it (cluster: the read-only data volume, /data/okvqa); images are recorded relative to it",
    )
    train_questions: str = Field(
        "OpenEnded_mscoco_train2014_questions.json",
        description="train questions JSON, relative to root",
    )
    train_annotations: str = Field(
        "mscoco_train2014_annotations.json",
        description="train answer annotations JSON, relative to root",
    )
    train_images: str = Field(
        "train2014",
        description="folder of the train images (COCO_train2014_*.jpg), relative to root",
    )
    val_questions: str = Field(
        "OpenEnded_mscoco_val2014_questions.json",
        description="validation questions JSON, relative to root",
    )
    val_annotations: str = Field(
        "mscoco_val2014_annotations.json",
        description="validation answer annotations JSON, relative to root",
    )
    val_images: str = Field("val2014", description="folder of the validation images, relative to root")
    max_train: Optional[int] = Field(
        None, ge=1,
        description="cap on the train split (first N in recorded order); None: all. Lower it for a quick run",
    )
    max_val: Optional[int] = Field(
        None, ge=1,
        description="cap on the validation split (first N in recorded order); None: all",
    )
    synthetic: SyntheticSpec = Field(
        SyntheticSpec(),
        description="the generated dataset (used only with dataset: synthetic)",
    )

    @field_validator("root")
    @classmethod
    def _local_root(cls, root: str) -> str:
        if "://" in root:
            raise ValueError(f"{root!r}: the dataset is read from a mounted folder (the cluster's read-only "
                             "data volume), not a URL; copy it there once (docs/kubernetes.md, Provisioning)")
        return root


class EncoderConfig(Section):
    kind: Literal["clip", "tiny_clip"] = Field(
        "clip",
        description="clip: a pretrained CLIP (name/revision) embeds images and questions for the sampler, the "
        "selector and retrieval; tiny_clip: a small seeded random CLIP for offline tests",
    )
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
    hidden_size: int = Field(32, ge=4, description="tiny_clip only: width of its vision and text towers")
    projection_dim: int = Field(32, ge=4, description="tiny_clip only: size of the joint embedding the selector reads")
    batch_size: int = Field(
        64, ge=1,
        description="items embedded per forward pass in export-embeddings; lower it on a small GPU",
    )
    seed: int = Field(0, description="tiny_clip only: seed of its random weights")


class SamplerConfig(Section):
    kind: Literal["random", "image_sim", "text_sim", "mix"] = Field(
        "random",
        description="how each query's candidate pool of pool_size train items is drawn for beams and RL data: "
        "at random, by CLIP image or question similarity, or mix (image similarity for mix_image_fraction of K, "
        "then question similarity)",
    )
    pool_size: int = Field(
        64, ge=1, description="K: candidate pool per query that beam search and RL data pick ICDs from; larger "
        "pools find better beams at a cost linear in K"
    )
    mix_image_fraction: float = Field(0.5, ge=0.0, le=1.0, description="mix: share of the pool by image similarity")


class LVLMConfig(Section):
    kind: Literal["qwen2_5_vl", "tiny_qwen2_5_vl"] = Field(
        "qwen2_5_vl",
        description="qwen2_5_vl: the pretrained Qwen2.5-VL (name/revision) that scores beams, judges RL data and "
        "answers at inference; tiny_qwen2_5_vl: a tiny seeded Qwen2.5-VL built from config (CPU, tests)",
    )
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
    short_name: str = Field(
        "qwen2.5_vl_3B",
        description="short human label of the LVLM (the seeds' folder names); no code reads it, but it is part "
        "of the key of every unit that uses the LVLM, so changing it rebuilds them",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and activations dtype; auto: bfloat16 on a GPU that supports it, float32 on CPU"
    )
    device: str = Field(
        "auto",
        description="torch device (cpu, cuda, cuda:1); auto: the first GPU if there is one, else CPU",
    )
    batch_size: int = Field(
        8, ge=1,
        description="prompts per LVLM forward pass when scoring and answering; raise it on a large GPU",
    )
    max_new_tokens: int = Field(
        5, ge=1,
        description="answer tokens generated at inference (OKVQA answers are one to three words)",
    )
    min_pixels: int = Field(
        56 * 56,
        description="lower bound on an image's area after the processor resizes it (pixels)",
    )
    max_pixels: int = Field(
        448 * 448, description="upper bound on an image's area after resizing; lower it to cut vision tokens and memory"
    )
    fast: bool = Field(True, description="use the cached/batched scoring path (the plain path stays as reference)")
    seed: int = Field(0, description="tiny_qwen2_5_vl only: seed of its random weights and warm-up")
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
    beam_size: int = Field(
        5, ge=1,
        description="B: beams kept per step of the InfoScore beam search (the v2 training targets)",
    )
    shots: int = Field(2, ge=1, le=8, description="S: length of InfoScore beams")
    num_queries: Optional[int] = Field(None, ge=1, description="train queries to build beams for (None: all)")
    shards: int = Field(
        1, ge=1,
        description="generate-beams units (pods) the queries are split over; part of each unit's key",
    )


class SourceCount(Section):
    enabled: bool = Field(True, description="whether this source adds candidates to each RL group")
    count: int = Field(2, ge=0, description="candidate sequences this source adds per query")


class SampleSource(Section):
    enabled: bool = Field(True, description="whether sequences sampled from the v2 selector join each RL group")
    temperatures: list[float] = Field(
        [1.0, 1.3],
        description="sampling temperatures of the v2 selector; higher adds diversity",
    )
    per_temperature: int = Field(2, ge=0, description="sequences sampled per query at each temperature")


class RLSources(Section):
    infoscore_beam: SourceCount = Field(
        SourceCount(enabled=True, count=5), description="the query's top InfoScore beams (generate-beams)"
    )
    v2_beam: SourceCount = Field(
        SourceCount(enabled=True, count=5),
        description="beam-search decodes of the v2 selector",
    )
    v2_sample: SampleSource = Field(SampleSource(), description="temperature samples of the v2 selector")
    retrieval: SourceCount = Field(
        SourceCount(enabled=True, count=2),
        description="sequences of the pool items closest to the query's CLIP embedding",
    )
    random: SourceCount = Field(SourceCount(enabled=True, count=2), description="seeded random sequences from the pool")


class BalancedConfig(Section):
    """The seeds' "balanced K=64" data: keep adding sequences until groups hold both outcomes."""

    enabled: bool = Field(
        False, description="keep sampling extra sequences for a query until its group holds both a correct and a "
        "wrong candidate (or max_extra_per_query is reached), so fewer groups have zero reward variance"
    )
    target_mixed_fraction: float = Field(
        0.8, ge=0.0, le=1.0,
        description="the seeds' target share of mixed groups; recorded only (no code reads it: topping up is per "
        "query), kept because it is part of generate-rl-data's key",
    )
    max_extra_per_query: int = Field(16, ge=0, description="most extra sequences judged per query when balancing")


class RLDataConfig(Section):
    shots: int = Field(2, ge=1, le=8, description="length of RL candidate sequences")
    num_queries: Optional[int] = Field(None, ge=1, description="train queries to build RL groups for (None: all)")
    shards: int = Field(1, ge=1, description="generate-rl-data units (pods) the queries are split over")
    sources: RLSources = Field(RLSources(), description="where each query's candidate sequences come from")
    balanced: BalancedConfig = Field(BalancedConfig(), description="top groups up until they hold both outcomes")
    variable_group_size: bool = Field(
        False,
        description="keep groups of whatever size the sources give (the seeds' k64 v3 data)",
    )


class SelectorConfig(Section):
    arch: Literal["pointer"] = Field(
        "pointer",
        description="selector architecture: the pointer network of SPEC section 4",
    )
    hidden: int = Field(256, ge=4, description="width of the query/candidate projections and attention layers")
    layers: int = Field(1, ge=0, description="query-over-candidates cross-attention layers (0: projections only)")
    heads: int = Field(1, ge=1, description="attention heads per cross-attention layer (must divide hidden)")
    temperature: float = Field(
        0.1, gt=0, description="divides the cosine scores before the softmax over candidates; lower is sharper"
    )
    dropout: float = Field(
        0.5, ge=0.0, lt=1.0,
        description="dropout in supervised (v2) and RCE training; GRPO runs with dropout off",
    )
    init: Literal["default", "siamese"] = Field(
        "default",
        description="default: PyTorch's initialisation (an untrained selector ranks candidates at random); "
        "siamese: query and candidate projections start equal (orthogonal), the scoring layers as the identity "
        "and the cross-attention branches at zero, so an untrained selector ranks by embedding cosine "
        "(retrieval) and training starts from there",
    )


class V2TrainConfig(Section):
    epochs: int = Field(
        10, ge=0,
        description="epochs of teacher-forced cross-entropy on the InfoScore beams (train-v2)",
    )
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate of train-v2")
    batch_size: int = Field(16, ge=1, description="beams per train-v2 step")
    score_threshold: Optional[float] = Field(None, description="drop beams scoring below this InfoScore")
    weight_decay: float = Field(1e-3, description="AdamW weight decay of train-v2")


class RewardConfig(Section):
    mode: Literal["hard_plus_soft", "separated", "hard_plus_gtprob_plus_rel", "legacy"] = Field(
        "hard_plus_soft",
        description="reward formula of a judged sequence (lever.rl.rewards, SPEC section 8): hard_plus_soft "
        "hard*correct + soft*acc_score; separated: 2*hard if correct, plus soft*acc_score; "
        "hard_plus_gtprob_plus_rel: hard*correct + soft*gt_prob + rel*(1-correct)*rel_score; legacy: "
        "alpha*beam_score + beta*correct (the reference trainer)",
    )
    hard_weight: float = Field(1.0, description="weight of the exact-match correctness term")
    soft_weight: float = Field(
        1.0,
        description="weight of the soft term (VQA accuracy score or ground-truth probability)",
    )
    rel_weight: float = Field(
        0.1,
        description="hard_plus_gtprob_plus_rel only: weight of the relevance score of wrong answers",
    )
    alpha: float = Field(0.5, description="legacy only: weight of the InfoScore beam score")
    beta: float = Field(
        0.8,
        description="legacy only: weight of correctness (not the KL coefficient: that is grpo.kl_beta)",
    )
    negate: bool = Field(
        False,
        description="ablation only: train on the negated reward, a deliberately harmful signal; a run with it "
        "must end below the baseline (the testbed's check that the evaluation can see a broken trainer)",
    )


class RCEConfig(Section):
    epochs: int = Field(
        5, ge=0,
        description="epochs of reward-weighted cross-entropy from the v2 weights (train-rce); 0 skips it",
    )
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate of train-rce")
    batch_size: int = Field(8, ge=1, description="RL groups per train-rce step")
    tau_start: float = Field(
        2.0, gt=0,
        description="softmax temperature over a group's rewards at the first step (high: near-uniform weights)",
    )
    tau_end: float = Field(
        0.5, gt=0, description="temperature at the last step (linear schedule); low concentrates on the best candidates"
    )
    normalized_reward: bool = Field(False, description="z-score rewards within each group before the softmax")
    weight_decay: float = Field(1e-3, description="AdamW weight decay of train-rce")


class AdaptiveBeta(Section):
    enabled: bool = Field(False, description="adapt the KL coefficient after every GRPO epoch from the measured KL")
    kl_low: float = Field(0.01, description="below this epoch KL, beta is divided by factor")
    kl_high: float = Field(0.1, description="above this epoch KL, beta is multiplied by factor")
    factor: float = Field(1.5, gt=1.0, description="multiplicative step of the adaptation")


class CurriculumConfig(Section):
    """plan9: phase 1 on high+medium quality queries, phase 2 on all, from phase 1's best."""

    enabled: bool = Field(
        False,
        description="train GRPO in two phases (replaces grpo.epochs by phase1_epochs + phase2_epochs)",
    )
    phase1_epochs: int = Field(30, description="epochs on the high and medium quality groups only")
    phase2_epochs: int = Field(
        20,
        description="epochs on all groups, from phase 1's checkpoint chosen by checkpoint.strategy",
    )
    high_gap: float = Field(1.5, description="a high-quality group's reward range (max - min) is at least this")
    high_min_each: int = Field(
        3,
        description="... and it holds at least this many correct and this many wrong candidates",
    )
    medium_gap: float = Field(1.0, description="reward range of a medium-quality group (lower bound)")
    medium_min_each: int = Field(2, description="correct and wrong candidates a medium-quality group holds at least")


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
    epochs: int = Field(
        0, ge=0,
        description="GRPO epochs after RCE (train-grpo); 0 skips GRPO and keeps the RCE selector",
    )
    rollout: Literal["offline", "online"] = Field(
        "offline",
        description="offline: GRPO over the fixed, pre-judged RL-data groups; online: each round the selector "
        "samples its own groups and the LVLM judges them (a GPU stage that loads the LVLM)",
    )
    online: OnlineRolloutConfig = Field(
        OnlineRolloutConfig(), description="settings of online rollouts (used only with rollout: online)"
    )
    lr: float = Field(5e-6, gt=0, description="AdamW learning rate of GRPO (small: the policy starts from RCE)")
    batch_size: int = Field(8, ge=1, description="groups (queries) per GRPO step")
    updates_per_round: int = Field(
        1, ge=1, description="policy updates per old-policy refresh; 1: the PPO ratio is always 1 at the step "
        "(plain policy gradient), more: later steps are clipped against the round's old policy"
    )
    kl_beta: float = Field(
        0.15, ge=0,
        description="coefficient of the KL penalty to the reference policy in the GRPO loss (the starting value "
        "with adaptive_beta); 0 keeps PPO-clip only (the KL is still measured)",
    )
    rank_advantage: bool = Field(
        True,
        description="true: advantages from reward ranks within the group; false: group z-scores (min_std, adv_clip)",
    )
    min_std: float = Field(
        0.1, gt=0,
        description="z-score advantages: floor on a group's reward std (avoids huge advantages)",
    )
    adv_clip: float = Field(5.0, gt=0, description="z-score advantages: clipped to [-adv_clip, adv_clip]")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip range of the policy ratio: [1-eps, 1+eps]")
    log_ratio_clamp: float = Field(
        20.0, gt=0,
        description="clamp on log-ratios before exp() (PPO ratio, k3 KL) so off-policy candidates cannot overflow",
    )
    # "exact": KL over the pointer's full candidate distributions.  k3 is an unbiased estimate only
    # for on-policy samples; GRPO here scores off-policy group candidates (beams, retrieval,
    # random), where k3 explodes (1e13 vs an exact KL of 2 on the tiny data) and hurt held-out
    # reward.  Both are always reported; set "k3" to reproduce the reference trainer.
    kl_estimator: Literal["k3", "exact"] = Field(
        "exact", description="KL term in the loss: exact (over the full candidate distributions) or k3 (the "
        "reference trainer's sampled estimate); both are always reported"
    )
    reference: Literal["rce", "v2", "none"] = Field(
        "rce", description="policy the KL penalty pulls towards: the RCE selector GRPO starts from, the v2 selector, "
        "or none (no KL term)"
    )
    adaptive_beta: AdaptiveBeta = Field(
        AdaptiveBeta(),
        description="adapt kl_beta to the measured KL after every epoch",
    )
    freeze_backbone: bool = Field(
        True, description="train only the final scoring projections (score_q, score_c); false: train the whole selector"
    )
    require_positive: bool = Field(
        False, description="train only on groups holding at least one correct candidate (the others give no signal)"
    )
    curriculum: CurriculumConfig = Field(CurriculumConfig(), description="two-phase training by group quality (plan9)")
    grad_clip: float = Field(1.0, description="gradient norm clip of every GRPO step")

    @model_validator(mode="after")
    def _online_supported(self) -> "GRPOConfig":
        if self.rollout == "online" and self.curriculum.enabled:
            raise ValueError("grpo.rollout 'online' does not combine with grpo.curriculum (its buckets are "
                             "built from the offline groups); turn one off")
        return self


class ValidationConfig(Section):
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of the training queries held out (seeded) for validation loss and reward "
        "of v2, RCE and GRPO (checkpoint selection)"
    )


class CheckpointConfig(Section):
    strategy: Literal["val_loss", "val_reward", "heldout_reward", "last", "epoch"] = Field(
        "last",
        description="val_loss (lowest), val_reward (highest), heldout_reward (highest reward of the policy's own "
        "judged samples on held-out queries: online GRPO only, RCE epochs fall back to the last), the last epoch, "
        "or a fixed epoch",
    )
    epoch: Optional[int] = Field(
        None, ge=1,
        description="strategy epoch: the epoch to take (capped at the last one trained)",
    )
    # GRPO epochs evaluated beside the chosen checkpoint (inference variants ``epoch{N}``, report
    # rows ``epoch{N}``); epochs past the plan's GRPO epoch count are not evaluated (see
    # lever.inference.variants.evaluated_epochs)
    evaluate_epochs: list[int] = Field(
        [], description="GRPO epochs evaluated beside the chosen checkpoint (inference variants and report rows "
        "epoch{N}); epochs past those trained are skipped"
    )

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
    split: Literal["val", "train"] = Field(
        "val", description="split the evaluation queries come from (train: a query never picks itself)"
    )
    num_samples: int = Field(800, ge=1, description="evaluation queries: the first N of split in recorded order")
    shots: list[int] = Field(
        [1, 2, 3, 4],
        description="ICD counts evaluated; each is its own inference unit and report column",
    )
    shards: int = Field(1, ge=1, description="inference units each (variant, shot) is split over")
    units_per_pod: int = Field(
        1, ge=1,
        description="inference units (variant x shot x shard) one Argo pod runs in a row with one model load; "
        "the cluster profile's value comes from `python -m lever.bench.cost_model` (load vs compute per pod). "
        "Not part of any key",
    )
    pool: Literal["train", "retrieved"] = Field(
        "train", description="ICDs are picked from the whole train split, or from each query's retrieve_top_n "
        "most similar train items"
    )
    retrieve_top_n: int = Field(64, ge=1, description="pool: retrieved only: size of each query's retrieved pool")
    baselines: list[Literal["random", "retrieval", "v2", "oracle"]] = Field(
        ["random", "retrieval"],
        description="reference variants evaluated beside the plan's selector: random ICDs, CLIP image "
        "retrieval, the v2 selector, and (synthetic data only) the oracle that knows the planted attribute",
    )
    seed: int = Field(0, description="seed of the random-ICD baseline (drawn per query from (seed, query index))")

    @model_validator(mode="after")
    def _shots_positive(self) -> "InferConfig":
        if not self.shots or any(s < 1 for s in self.shots):
            raise ValueError("shots must be a non-empty list of positive integers")
        return self


#: how a per-shot plan-vs-baseline difference is judged a regression (lever.report.regression)
RegressionRule = Literal["strict", "significant"]


class AlertConfig(Section):
    kl_max: float = Field(5.0, description="alert (and guard) when a GRPO epoch's KL to the reference exceeds this")
    kl_growth_per_epoch: float = Field(2.0, description="alert when the KL grows by more than this in one epoch")
    adv_std_floor: float = Field(0.01, description="advantage std below which an epoch counts as signal-starved")
    adv_std_epochs: int = Field(3, description="alert after this many signal-starved epochs in a row")
    val_loss_rising_epochs: int = Field(5, description="alert when validation loss rose this many epochs in a row")
    stalled_minutes: int = Field(30, description="alert when a running stage has not reported for this long")
    regression_margin: float = Field(
        1.5, description="accuracy points a plan may fall below its baseline at a shot before it counts as a regression"
    )
    # strict: the CI's upper bound is below -margin; significant: diff < -margin and the CI
    # excludes 0.  One rule for `lever regress`, the report's verdict and the nightly alert.
    regression_rule: RegressionRule = Field(
        "strict", description="strict: the CI's upper bound is below -margin; significant: the difference is below "
        "-margin and the CI excludes 0 (one rule for lever regress, the report and the nightly alert)"
    )
    guard: Literal["off", "warn", "stop", "rollback"] = Field(
        "warn", description="what the in-loop divergence guard does when an alert threshold is crossed: nothing, "
        "log, stop training, or stop and roll back to the last good epoch"
    )
    # Prometheus side only (lever.obs.alerts): how long a condition must hold before an alert
    # fires, and how long after a run's last push its alerts still count (Pushgateway keeps
    # finished runs' groups forever; without this, one diverged run would alert for ever).
    for_minutes: float = Field(
        1.0, ge=0,
        description="Prometheus rules: how long a condition must hold before its alert fires",
    )
    retention_hours: float = Field(
        24.0, gt=0, description="Prometheus rules: a run's alerts count only this long after its last push"
    )


class ReportConfig(Section):
    bootstrap_samples: int = Field(
        2000, ge=100,
        description="paired bootstrap resamples per confidence interval of the report",
    )
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="level of the report's confidence intervals")
    references: list[str] = Field(
        [], description="inference variants shown as reference rows; empty: the plan's infer.baselines"
    )


class PlatformConfig(Section):
    image: str = Field(
        "ghcr.io/lever-ml/lever:0.1.0",
        description="container image of the GPU (and heavy CPU) stage pods",
    )
    slim_image: str = Field(
        "ghcr.io/lever-ml/lever-slim:0.1.0",
        description="smaller CPU-only image of the light steps (list-units, summarize, regress)",
    )
    namespace: str = Field("lever", description="Kubernetes namespace the workflows run in")
    gpu_per_pod: int = Field(1, description="nvidia.com/gpu requested by each GPU stage pod")
    node_selector: dict[str, str] = Field({}, description="node labels GPU pods must match (e.g. a GPU product label)")
    tolerations: list[dict[str, str]] = Field([], description="tolerations of GPU pods (e.g. for tainted GPU nodes)")
    service_account: str = Field("lever", description="ServiceAccount the workflow pods run as")
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
    pushgateway_url: str = Field(
        "http://prometheus-pushgateway.monitoring.svc:9091", description="Pushgateway training telemetry is pushed to"
    )
    run_as_user: int = Field(10001, ge=1, description="numeric non-root UID of every pod (matches the images)")
    gpu_cpu: str = Field("8", description="CPU request of a GPU stage pod (Kubernetes quantity)")
    gpu_memory: str = Field("64Gi", description="memory request of a GPU stage pod")
    cpu_cpu: str = Field("2", description="CPU request of a CPU stage pod")
    cpu_memory: str = Field("8Gi", description="memory request of a CPU stage pod")
    shm_size: str = Field("16Gi", description="size of the in-memory /dev/shm volume of GPU pods (PyTorch workers)")
    cache_size: str = Field("100Gi", description="size limit of each pod's /cache scratch volume")
    retry_limit: int = Field(
        3, ge=0,
        description="Argo retries of a failed step (user errors, exit 2, are never retried)",
    )
    retry_backoff: str = Field("1m", description="wait before the first retry (Argo duration)")
    retry_factor: int = Field(2, ge=1, description="growth factor of the wait between retries")
    retry_max_duration: str = Field("2h", description="no retry starts after this long since the first attempt")
    nightly_schedule: str = Field("0 2 * * *", description="cron schedule of the nightly CronWorkflow")
    nightly_timezone: str = Field("Etc/UTC", description="time zone of nightly_schedule")


class PlanConfig(Section):
    name: str = Field(..., description="plan name (its preset file's stem); names runs, reports and workflows")
    description: str = Field("", description="one line for humans, shown by `lever plans`")
    extends: Optional[str] = Field(
        None,
        description="parent plan whose settings this one starts from (a diff against it)",
    )
    profile: Optional[str] = Field(
        None,
        description="profile overlay the plan was loaded with (tiny, cluster); set by the loader",
    )
    seed: int = Field(
        42,
        description="seed of splits, candidate draws and training; another seed is another run of the same recipe",
    )
    recommended: bool = Field(
        False,
        description="marks the one shipped plan the nightly workflow runs and the shared manifests default to",
    )
    data: DataConfig = Field(DataConfig(), description="the dataset and its splits")
    encoder: EncoderConfig = Field(EncoderConfig(), description="the CLIP encoder of images and questions")
    sampler: SamplerConfig = Field(SamplerConfig(), description="candidate pools of beams and RL data")
    lvlm: LVLMConfig = Field(LVLMConfig(), description="the vision-language model that scores, judges and answers")
    models: ModelsConfig = Field(ModelsConfig(), description="where provisioned model snapshots are read from")
    beam: BeamConfig = Field(BeamConfig(), description="InfoScore beam search (generate-beams)")
    rl_data: RLDataConfig = Field(
        RLDataConfig(),
        description="judged candidate groups for RCE and GRPO (generate-rl-data)",
    )
    selector: SelectorConfig = Field(SelectorConfig(), description="the pointer selector's architecture")
    v2: V2TrainConfig = Field(V2TrainConfig(), description="supervised training on the beams (train-v2)")
    reward: RewardConfig = Field(RewardConfig(), description="reward of a judged candidate sequence")
    rce: RCEConfig = Field(RCEConfig(), description="reward-weighted cross-entropy (train-rce)")
    grpo: GRPOConfig = Field(GRPOConfig(), description="GRPO fine-tuning (train-grpo)")
    validation: ValidationConfig = Field(ValidationConfig(), description="held-out training queries")
    checkpoint: CheckpointConfig = Field(CheckpointConfig(), description="which epoch becomes the plan's selector")
    infer: InferConfig = Field(InferConfig(), description="evaluation: queries, shots, pool and baselines")
    alerts: AlertConfig = Field(AlertConfig(), description="alert thresholds (Prometheus rules and the in-loop guard)")
    report: ReportConfig = Field(ReportConfig(), description="statistics of the report")
    platform: PlatformConfig = Field(PlatformConfig(), description="Kubernetes/Argo settings of the rendered workflows")
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
