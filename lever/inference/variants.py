"""Which GRPO epochs a plan trains and which inference variants and epoch checkpoints it evaluates:
one home for the rule the training stage (how many epochs), the pipeline graph (which units exist),
the inference stage (what a variant loads) and the report (which rows to expect) all follow.  It
reads the plan's config only, so importing it (and with it the graph) stays cheap.
"""

from __future__ import annotations

import re
from typing import Optional

from lever.config.schema import PlanConfig

EPOCH_VARIANT = re.compile(r"^epoch([1-9][0-9]*)$")


def grpo_epochs_trained(plan: PlanConfig) -> int:
    """How many GRPO epochs ``train-grpo`` runs for this plan: none when ``grpo.epochs`` is 0, the
    two curriculum phases when the curriculum is on, else ``grpo.epochs``.  The training stage, the
    graph's epoch units and the report all ask this one function."""
    g = plan.grpo
    if g.epochs == 0:
        return 0
    cur = g.curriculum
    return cur.phase1_epochs + cur.phase2_epochs if cur.enabled else g.epochs


def evaluated_epochs(plan: PlanConfig) -> list[int]:
    """``checkpoint.evaluate_epochs`` the plan's GRPO trains, sorted.  An epoch past the plan's
    GRPO epoch count (plan1 run with ``--set grpo.epochs=2``) is no unit: the report lists it as
    not trained instead of the run failing on a checkpoint that cannot exist."""
    total = grpo_epochs_trained(plan)
    return sorted(e for e in plan.checkpoint.evaluate_epochs if e <= total)


def epoch_of_variant(variant: object) -> Optional[int]:
    """N for an ``epoch{N}`` inference variant (GRPO epoch N's checkpoint), else None."""
    m = EPOCH_VARIANT.match(str(variant))
    return int(m.group(1)) if m else None


def infer_variants(plan: PlanConfig) -> list[str]:
    """'selector' is the plan's own chosen checkpoint; ``epoch{N}`` the GRPO epoch-N checkpoints
    of ``checkpoint.evaluate_epochs``; the others are reference baselines."""
    return ["selector"] + [f"epoch{e}" for e in evaluated_epochs(plan)] + reference_variants(plan)


def reference_variants(plan: PlanConfig) -> list[str]:
    """``infer.baselines`` this plan can evaluate: the oracle knows the synthetic generator's
    planted labels, so on real data (a tiny profile pointed at OKVQA, say) it is no unit."""
    return [b for b in plan.infer.baselines if b != "oracle" or plan.data.dataset == "synthetic"]
