"""``lever compare``: the seeds' multi-plan summary table (plans as rows, shots as columns).

Rows: the plans (their chosen checkpoints), then each plan's evaluated GRPO epoch checkpoints
(``plan1 epoch2``; ``checkpoint.evaluate_epochs``), then the reference selectors once each.
Reads only the committed ``infer`` units of each plan (keys computed from the plan configs), so it
works for any mix of finished and unfinished plans: a missing cell is shown as missing, never 0.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from lever.config.schema import PlanConfig
from lever.inference.variants import evaluated_epochs, reference_variants
from lever.pipeline.graph import STAGES, Stage
from lever.pipeline.hashing import plan_keys
from lever.storage.store import CorruptArtifact, Store
from lever.report.predictions import collect

MISSING = "—"


def infer_units(plan: PlanConfig, stages: Sequence[Stage], variants: Sequence[str]) -> list[tuple[Any, str]]:
    """(unit, store key) of the plan's ``infer`` units of these variants, keys from its config."""
    keys = plan_keys(plan, stages)
    return [(u, f"infer/{h}") for u, h in keys.units["infer"] if u.get("variant") in variants]


def open_infer_units(store: Store, units: Sequence[tuple[Any, str]]) -> tuple[list[tuple[Any, Any]], list[Any]]:
    """The committed ones of ``units`` opened as (unit, local dir), and the units that are not
    there (or failed verification): a reader shows those as missing, never as 0."""
    opened, missing = [], []
    for u, key in units:
        try:
            opened.append((u, store.open(key)))
        except (KeyError, CorruptArtifact):
            missing.append(u)
    return opened, missing


def _cell_table(store: Store, plan: PlanConfig, stages: Sequence[Stage], variants: Sequence[str]) -> dict[str, dict[int, Any]]:
    opened, _ = open_infer_units(store, infer_units(plan, stages, variants))
    cells = collect(opened)
    out: dict[str, dict[int, Any]] = {}
    for v in variants:
        out[v] = {}
        for s in plan.infer.shots:
            c = cells.get((v, s))
            out[v][s] = round(c.accuracy, 2) if c is not None and c.n and c.complete else None
    return out


def compare_plans(plans: Sequence[PlanConfig], store: Store, *, references: bool = True, epochs: bool = True,
                  stages: Sequence[Stage] = STAGES) -> dict:
    shots = sorted({s for p in plans for s in p.infer.shots})
    rows = []
    epoch_rows = []  # "PLAN epochN": the GRPO epoch checkpoints of checkpoint.evaluate_epochs, below the plans
    ref_rows = []  # reference selectors (random, retrieval, v2) once each, below those
    seen_refs: set[str] = set()
    for p in plans:
        ep = [f"epoch{e}" for e in evaluated_epochs(p)] if epochs else []
        refs = [v for v in reference_variants(p) if v not in seen_refs] if references else []
        table = _cell_table(store, p, stages, ["selector", *ep, *refs])
        rows.append({"name": p.name, "kind": "plan", "acc": {s: table["selector"].get(s) for s in shots}})
        for v in ep:
            epoch_rows.append({"name": f"{p.name} {v}", "kind": "epoch", "acc": {s: table[v].get(s) for s in shots}})
        for v in refs:
            seen_refs.add(v)
            ref_rows.append({"name": v, "kind": "reference", "acc": {s: table[v].get(s) for s in shots}})
    rows += epoch_rows + ref_rows
    for r in rows:
        vals = [r["acc"][s] for s in shots]
        r["avg"] = round(statistics.fmean(vals), 2) if all(v is not None for v in vals) else None
    best: dict[str, list[str]] = {}
    for col in [str(s) for s in shots] + ["avg"]:
        vals = [(r["acc"][int(col)] if col != "avg" else r["avg"], r["name"]) for r in rows]
        vals = [v for v in vals if v[0] is not None]
        if vals:
            top = max(v[0] for v in vals)
            best[col] = [name for v, name in vals if v == top]
    return {"shots": shots, "rows": [dict(r, acc={str(k): v for k, v in r["acc"].items()}) for r in rows], "best": best}


def _fmt(v: Any, is_best: bool, bold: tuple[str, str]) -> str:
    if v is None:
        return MISSING
    s = f"{v:.2f}"
    return f"{bold[0]}{s}{bold[1]}" if is_best else s


def render_markdown(table: dict) -> str:
    cols = [str(s) for s in table["shots"]] + ["avg"]
    lines = ["| plan | " + " | ".join(f"shot {c}" if c != "avg" else "avg" for c in cols) + " |",
             "|---|" + "|".join("---" for _ in cols) + "|"]
    for r in table["rows"]:
        vals = [r["acc"][c] if c != "avg" else r["avg"] for c in cols]
        cells = [_fmt(v, r["name"] in table["best"].get(c, []), ("**", "**")) for c, v in zip(cols, vals)]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("VQA accuracy (%); best per column in bold; — = not (fully) evaluated yet.")
    return "\n".join(lines)


def render_rich(table: dict) -> Any:
    from rich.table import Table

    t = Table(title="VQA accuracy (%) — best per column in bold")
    cols = [str(s) for s in table["shots"]] + ["avg"]
    t.add_column("plan")
    for c in cols:
        t.add_column(f"shot {c}" if c != "avg" else "avg", justify="right")
    for r in table["rows"]:
        vals = [r["acc"][c] if c != "avg" else r["avg"] for c in cols]
        name = r["name"] if r["kind"] == "plan" else f"[dim]{r['name']}[/dim]"
        t.add_row(name, *[_fmt(v, r["name"] in table["best"].get(c, []), ("[bold green]", "[/bold green]")) for c, v in zip(cols, vals)])
    return t
