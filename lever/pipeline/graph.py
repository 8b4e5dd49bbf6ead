"""The pipeline, defined once as data.

Both executors read this table: the local runner (``lever.pipeline.runner``) walks it in order
inside one process tree, and the Argo renderer (``lever.platform.workflows``) turns each entry
into a Container template running ``lever stage NAME``.  A stage entry names the function that
does the work (imported lazily so that rendering workflows never imports torch), the upstream
stages it reads, the config sections its output depends on (for content addressing), and how it
fans out.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

from lever.config.paths import check_config_path
from lever.config.schema import PlanConfig
from lever.context import Unit
from lever.inference.variants import epoch_of_variant, infer_variants

FanOut = Literal["none", "shard", "infer"]


@dataclass(frozen=True)
class Stage:
    name: str
    func: str  # "module:function", called as func(ctx: StageContext) -> None
    inputs: tuple[str, ...]
    config_fields: tuple[str, ...]
    fanout: FanOut = "none"
    gpu: bool = False
    description: str = ""
    # inputs a given unit really reads (default: all); lets the random/retrieval inference units
    # of two plans share one artifact because they do not depend on the plan's selector.
    unit_inputs: Optional[Callable[[Unit], tuple[str, ...]]] = field(default=None, compare=False)
    # the stage also reads the baseline plan's outputs of its inputs (summarize): their hashes
    # join its key and the runner fills ``ctx.baseline_inputs``
    with_baseline: bool = False
    # the stage's code version: bump it when a code change alters what the stage writes for the
    # same config and inputs (a fixed reward formula, a new output field), so that cached
    # artifacts of the old code are rebuilt -- with everything downstream, whose keys include
    # this stage's hash -- instead of being reused.  Edits that keep the output (speed,
    # refactoring, messages) keep the version and the cache.
    version: int = 1
    # upstream stages only some plans read (named in plan_extra); listed here so that the Argo DAG
    # and ``--only`` closures wait for them
    optional_inputs: tuple[str, ...] = ()
    # its pods mount the provisioned datasets and models volumes even though its config fields do
    # not name data/encoder/lvlm (a plan may make it load the LVLM: online GRPO)
    provisioned: bool = False
    # what a plan's settings add to the stage's inputs and key: ``plan -> (inputs, config fields)``.
    # train-grpo reads the dataset and the LVLM only with online rollouts; offline plans do not
    # depend on them (an LVLM change must not retrain their GRPO)
    plan_extra: Optional[Callable[[PlanConfig], tuple[tuple[str, ...], tuple[str, ...]]]] = field(
        default=None, compare=False)

    def __post_init__(self) -> None:
        # the declared config fields are the stage's key material: each must be a schema path
        for f in self.config_fields:
            try:
                check_config_path(f)
            except ValueError as exc:
                raise ValueError(f"stage {self.name!r}: {exc}") from None

    def load(self) -> Callable[..., None]:
        module, _, attr = self.func.partition(":")
        return getattr(importlib.import_module(module), attr)

    def units(self, plan: PlanConfig) -> list[Unit]:
        if self.fanout == "none":
            return [Unit(self.name)]
        if self.fanout == "shard":
            n = shard_count(self.name, plan)
            return [Unit(self.name, (("shard", i), ("of", n))) for i in range(n)]
        out = []
        for variant in infer_variants(plan):
            for shot in plan.infer.shots:
                for i in range(plan.infer.shards):
                    out.append(Unit(self.name, (("variant", variant), ("shot", shot), ("shard", i), ("of", plan.infer.shards))))
        return out

    def inputs_for(self, unit: Unit, plan: Optional[PlanConfig] = None) -> tuple[str, ...]:
        """The upstream stages ``unit`` reads (with ``plan``: including what its settings add)."""
        base = self.unit_inputs(unit) if self.unit_inputs else self.inputs
        if plan is None or self.plan_extra is None:
            return base
        return base + tuple(n for n in self.plan_extra(plan)[0] if n not in base)

    def fields_for(self, plan: PlanConfig) -> tuple[str, ...]:
        """The config fields in the key of this stage's units for ``plan``."""
        if self.plan_extra is None:
            return self.config_fields
        extra = tuple(f for f in self.plan_extra(plan)[1] if f not in self.config_fields)
        for f in extra:
            check_config_path(f)
        return self.config_fields + extra

    def may_read(self) -> tuple[str, ...]:
        """Every upstream stage some plan makes this stage read (Argo dependencies, closures)."""
        return self.inputs + tuple(n for n in self.optional_inputs if n not in self.inputs)


def pod_groups(stage: Stage, plan: PlanConfig) -> list[list[Unit]]:
    """The units of ``stage`` grouped the way Argo runs them: one group per pod, run in a row in
    one process (one model load).  Inference units are small, so ``infer.units_per_pod``
    consecutive ones (same variant first, then shot) share a pod; every other unit has its own."""
    units = stage.units(plan)
    size = plan.infer.units_per_pod if stage.fanout == "infer" else 1
    return [units[i:i + size] for i in range(0, len(units), size)]


#: separates unit ids in one ``--unit-id`` / ``--list-units`` item (ids never contain it)
UNIT_ID_SEP = ","


def shard_count(stage: str, plan: PlanConfig) -> int:
    return {"generate-beams": plan.beam.shards, "generate-rl-data": plan.rl_data.shards}.get(stage, 1)









def _infer_inputs(unit: Unit) -> tuple[str, ...]:
    """What each variant reads, so its key depends on nothing else: the chosen checkpoint
    (convert), one GRPO epoch (train-grpo), the v2 selector (train-v2), or -- random/retrieval --
    only data and embeddings, which makes those units one artifact shared by every plan."""
    variant = unit.get("variant")
    base = ("prepare-data", "export-embeddings")
    if variant == "selector":
        return base + ("convert",)
    if epoch_of_variant(variant) is not None:
        return base + ("train-grpo",)
    if variant == "v2":
        return base + ("train-v2",)
    return base


def _grpo_extra(plan: PlanConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Online rollouts judge sequences with the LVLM on the dataset's images: the dataset artifact
    and the ``lvlm`` section join train-grpo's inputs and key (offline GRPO reads neither)."""
    if plan.grpo.rollout == "online" and plan.grpo.epochs > 0:
        return ("prepare-data",), ("lvlm",)
    return (), ()


# the alert thresholds the divergence guard applies inside training (lever.obs.guard); the rest
# of ``alerts`` (regression margin, stall time, ...) must not invalidate trained checkpoints
GUARD_FIELDS: tuple[str, ...] = ("alerts.guard", "alerts.kl_max", "alerts.kl_growth_per_epoch",
                                 "alerts.adv_std_floor", "alerts.adv_std_epochs",
                                 "alerts.val_loss_rising_epochs")

STAGES: tuple[Stage, ...] = (
    Stage("prepare-data", "lever.stages.prepare_data:prepare_data", (), ("data",),
          version=2,  # 2: synthetic generator v5 (planted code-word signal, planted_value annotations)
          description="normalized dataset index (train/val, fixed question_id order)"),
    Stage("export-embeddings", "lever.stages.embeddings:export_embeddings", ("prepare-data",), ("encoder",),
          gpu=True, version=2,  # 2: the tiny CLIP spreads its image embeddings (encoder._spread)
          description="query/candidate CLIP-style embeddings (safetensors)"),
    Stage("generate-beams", "lever.stages.sampling:generate_beams", ("prepare-data", "export-embeddings"),
          ("sampler", "lvlm", "beam", "seed"), fanout="shard", gpu=True,
          description="InfoScore beam search with the LVLM, sharded by query range"),
    Stage("train-v2", "lever.stages.training:train_v2", ("export-embeddings", "generate-beams"),
          ("selector", "v2", "seed"), gpu=True, description="v2 pointer selector, CE on the beams"),
    Stage("generate-rl-data", "lever.stages.sampling:generate_rl_data",
          ("prepare-data", "export-embeddings", "generate-beams", "train-v2"),
          ("sampler", "lvlm", "rl_data", "seed"), fanout="shard", gpu=True,
          description="RL groups from beams, v2, retrieval and random sources, judged by the LVLM"),
    Stage("train-rce", "lever.stages.training:train_rce", ("export-embeddings", "generate-rl-data", "train-v2"),
          ("selector", "reward", "rce", "validation", "seed"), gpu=True,
          description="reward-weighted CE from the v2 weights"),
    Stage("train-grpo", "lever.stages.training:train_grpo",
          ("export-embeddings", "generate-rl-data", "train-rce", "train-v2"),
          ("selector", "reward", "grpo", "validation", "seed") + GUARD_FIELDS, gpu=True,
          description="GRPO from the RCE result (online rollouts: judged by the LVLM during training)",
          optional_inputs=("prepare-data",), plan_extra=_grpo_extra, provisioned=True),
    Stage("select-checkpoint", "lever.stages.training:select_checkpoint", ("train-v2", "train-rce", "train-grpo"),
          ("checkpoint", "selector_source"), description="pick the checkpoint (val_loss | val_reward | last | epoch)"),
    Stage("convert", "lever.stages.training:convert", ("select-checkpoint",), (),
          description="v3 checkpoint -> v2 layout for inference"),
    Stage("infer", "lever.stages.inference:infer",
          ("prepare-data", "export-embeddings", "convert", "train-v2", "train-grpo"),
          # not the whole infer section: shots/baselines/shards only pick units (and the unit params
          # carry shot, variant, shard, of), so a plan with other shots still shares each unit
          ("lvlm", "infer.split", "infer.num_samples", "infer.pool", "infer.retrieve_top_n", "infer.seed"),
          fanout="infer", gpu=True, unit_inputs=_infer_inputs,
          description="predictions per (variant, shot, shard)"),
    Stage("summarize", "lever.stages.summarize:summarize",
          ("infer", "generate-rl-data", "train-rce", "train-grpo", "select-checkpoint"),
          ("name", "baseline_plan", "report", "infer.shots", "checkpoint.evaluate_epochs",
           "alerts.regression_margin", "alerts.regression_rule"),
          with_baseline=True, version=2,  # 2: conclusions, reference_comparison, oracle rows
          description="report.md, report.json and plots against the baseline plan"),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(BY_NAME)}") from None


def order() -> list[str]:
    return [s.name for s in STAGES]


def training_stages() -> list[str]:
    return ["train-v2", "train-rce", "train-grpo", "select-checkpoint", "convert"]
