"""``lever campaign report``: the leaderboard of a campaign, from what the store holds.

Reads the committed ``infer`` units (variant ``selector``) of every member and of its baseline,
at keys computed from the resolved configs (as ``lever compare`` does), so it works on a finished
campaign, a half-finished one (missing members are listed, never shown as 0) and on Argo, where
it is the workflow's exit handler.  The result is itself a store artifact,
``campaign/<hash>/{leaderboard.md, leaderboard.json, sweep.png}``, keyed by the campaign's
statistics settings and every infer key it read: a rerun of a finished campaign is a store hit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from lever.campaign.compare import infer_units, open_infer_units
from lever.campaign.leaderboard import METHOD, MemberData, build_leaderboard
from lever.campaign.loader import Campaign
from lever.config.schema import PlanConfig
from lever.io import atomic_write_bytes
from lever.pipeline.graph import STAGES, Stage
from lever.storage.store import Store
from lever.report.predictions import collect

SCHEMA = 1
STAGE = "campaign"  # store keys campaign/<hash>


def _selector_units(plan: PlanConfig, stages: Sequence[Stage]) -> list[tuple[Any, str]]:
    return infer_units(plan, stages, ["selector"])


def _arm(store: Store, plan: PlanConfig, stages: Sequence[Stage], shots: Sequence[int],
         label: str, missing: list[str]) -> Optional[dict[int, dict[int, float]]]:
    """shot -> question_id -> accuracy of the plan's chosen selector, or None (reason in ``missing``)."""
    opened, absent = open_infer_units(store, _selector_units(plan, stages))
    missing.extend(f"{label}: infer {u.id}" for u in absent)
    if absent:
        return None
    cells = collect(opened)
    out = {}
    for k in shots:
        cell = cells.get(("selector", k))
        if cell is None or not cell.complete or not cell.n:
            missing.append(f"{label}: shot {k} not evaluated")
            return None
        out[k] = {q: float(r["accuracy"]) for q, r in cell.rows.items()}
    return out


def infer_keys(runs: list, stages: Sequence[Stage] = STAGES) -> list[str]:
    out = []
    for _, _, plan, base in runs:
        out += [k for _, k in _selector_units(plan, stages)] + [k for _, k in _selector_units(base, stages)]
    return out


def report_key(camp: Campaign, runs: list, stages: Sequence[Stage] = STAGES) -> str:
    blob = json.dumps({"schema": SCHEMA, "campaign": camp.config.model_dump(mode="json"),
                       "members": [m.name for m in camp.members], "infer": infer_keys(runs, stages)},
                      sort_keys=True, default=str)
    return f"{STAGE}/{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def shots_of(camp: Campaign, runs: list) -> list[int]:
    if camp.config.shots:
        return sorted(camp.config.shots)
    shots = sorted({s for _, _, p, _ in runs for s in p.infer.shots})
    common = [s for s in shots if all(s in p.infer.shots for _, _, p, _ in runs)]
    return common


def compute(camp: Campaign, runs: list, store: Store, stages: Sequence[Stage] = STAGES) -> dict:
    """The leaderboard dict (JSON-ready) for the campaign's current store contents."""
    shots = shots_of(camp, runs)
    data: dict[str, MemberData] = {}
    for member, seed, plan, base in runs:
        md = data.setdefault(member.name, MemberData(member.name, {}, member.swept, member.sweep))
        label = member.name + (f" seed {seed}" if seed is not None else "")
        a = _arm(store, plan, stages, shots, label, md.missing)
        b = _arm(store, base, stages, shots, f"{label} baseline {base.name}", md.missing)
        md.runs[seed] = (a, b)
    lb = camp.config.leaderboard
    board = build_leaderboard(list(data.values()), shots, alpha=lb.alpha, confidence=lb.confidence,
                              bootstrap_samples=lb.bootstrap_samples, permutations=lb.permutations,
                              margin=lb.margin, seed=lb.seed)
    board.update({"schema_version": SCHEMA, "campaign": camp.name, "description": camp.config.description,
                  "baseline": camp.config.baseline, "seeds": camp.config.seeds,
                  "sweeps": [{"plan": s.plan, "fields": list(s.grid)} for s in camp.config.sweeps]})
    return board


def _cell(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.2f}"


def _signed(v: float) -> str:
    return f"{v:+.2f}"


def render_markdown(board: dict, plots: Sequence[str] = ()) -> str:
    shots = board["shots"]
    alpha = board["alpha"]
    conf = int(round(board["confidence"] * 100))
    m = board["family_size"]
    simult = 100 * (1 - alpha / max(1, m))
    lines = [f"# Campaign {board['campaign']}: leaderboard vs {board['baseline']}", ""]
    if board.get("description"):
        lines += [board["description"], ""]
    lines += [
        f"VQA accuracy (%) of each member's chosen selector; `diff` = member minus baseline on the same questions "
        f"(average over shots {', '.join(map(str, shots))}).",
        "",
        f"**Test and family.** {board['method']}. Family: the {m} complete member(s) on the average; "
        f"alpha = {alpha:g}. Average intervals are {simult:.2f}% simultaneous intervals; per-shot intervals are "
        f"{conf}% and unadjusted (`*`: Holm-adjusted p < {alpha:g} over the {board['family_size_shots']} "
        f"member x shot tests).",
        "",
    ]
    if board["best"]:
        lines.append(f"**Best member: {board['best']}** (the largest average gain among the members that beat the "
                     f"baseline after Holm's adjustment; marked ★).")
    else:
        lines.append("**No member is marked best**: none beats the baseline after Holm's adjustment.")
    if board["unadjusted_best"] and board["unadjusted_best"] != board["best"]:
        lines.append(f"Without the adjustment, {board['unadjusted_best']} would have been marked best "
                     f"(unadjusted p < {alpha:g}); with {m} comparisons that is within what chance alone gives.")
    if board["regressions"]:
        lines.append(f"**Significantly worse than the baseline** (Holm, margin {board['margin']:g} points): "
                     + ", ".join(board["regressions"]) + ".")
    lines.append("")
    head = "| member | " + " | ".join(f"shot {k}" for k in shots) + " | avg | diff [simult. CI] | p | p (Holm) |"
    if board.get("seeds") and len(board["seeds"]) > 1:
        head += " seed sd (avg / diff) |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    complete = [r for r in board["rows"] if r["complete"]]
    if complete:
        base = complete[0]
        same = all(r["baseline"] == base["baseline"] for r in complete)
        label = board["baseline"] + ("" if board["baseline"] == "baseline" else " (baseline)") + ("" if same else " ¹")
        cells = [_cell(base["baseline"][str(k)]) for k in shots]
        row = f"| {label} | " + " | ".join(cells) + f" | {_cell(base['baseline_average'])} | | | |"
        if head.endswith("diff) |"):
            row += " |"
        lines.append(row)
    for r in sorted(board["rows"], key=lambda r: (not r["complete"], -(r.get("average") or 0))):
        if not r["complete"]:
            lines.append(f"| {r['name']} | " + " | ".join("—" for _ in shots) + " | — | missing | | |"
                         + (" |" if head.endswith("diff) |") else ""))
            continue
        cells = []
        for k in shots:
            s = r["shots"][str(k)]
            cells.append(f"{_cell(r['accuracy'][str(k)])} ({_signed(s['diff'])} [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}])"
                         + ("*" if s["significant"] else ""))
        name = f"★ **{r['name']}**" if r["best"] else r["name"]
        line = (f"| {name} | " + " | ".join(cells) + f" | {_cell(r['average'])} | {_signed(r['diff'])} "
                f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | {r['p']:.4f} | {r['p_holm']:.4f} |")
        if head.endswith("diff) |"):
            sp = r.get("seed_spread") or {}
            line += f" {_cell(sp.get('average_sd'))} / {_cell(sp.get('diff_sd'))} |"
        lines.append(line)
    lines.append("")
    if complete and not all(r["baseline"] == complete[0]["baseline"] for r in complete):
        lines += ["¹ members that override a setting the baseline shares (data, models, beams, RL data, eval) are "
                  "compared with the baseline run under the same setting; the row shows the first member's.", ""]
    if board.get("seeds") and len(board["seeds"]) > 1:
        lines += [f"Seeds {', '.join(map(str, board['seeds']))}: member and baseline rerun with each seed "
                  "(everything seeded is rebuilt); cells are means over seeds; `seed sd` is the standard deviation "
                  "over seeds of the member's average accuracy and of its difference from the baseline.", ""]
    if board["incomplete"]:
        lines.append("## Missing")
        for r in board["rows"]:
            if not r["complete"]:
                lines.append(f"- {r['name']}: " + "; ".join(r["missing"][:6])
                             + (f" (+{len(r['missing']) - 6} more)" if len(r["missing"]) > 6 else ""))
        lines.append("")
    for p in plots:
        lines += [f"![{Path(p).stem}]({p})", ""]
    return "\n".join(lines)


def _num(v: Any) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def write_sweep_plot(board: dict, out: Path) -> list[str]:
    """One panel per swept field: the average difference from the baseline (with its simultaneous
    interval) against the field's value; points that share the other fields' values are joined."""
    panels = []
    for j, sw in enumerate(board.get("sweeps", [])):
        rows = [r for r in board["rows"] if r.get("sweep") == j and r["complete"]]
        for f in sw["fields"]:
            panels.append((sw["plan"], f, rows))
    panels = [p for p in panels if p[2]]
    if not panels:
        return []
    from lever.report.plots import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (plan, f, rows) in zip(axes[0], panels):
        groups: dict[str, list[dict]] = {}
        for r in rows:
            rest = ", ".join(f"{k}={v}" for k, v in r["swept"].items() if k != f) or plan
            groups.setdefault(rest, []).append(r)
        xs_all = []
        for label, rs in groups.items():
            pts = sorted(((_num(r["swept"][f]), r) for r in rs), key=lambda t: (t[0] is None, t[0] or 0))
            xs = [x if x is not None else i for i, (x, _) in enumerate(pts)]
            xs_all += xs
            ys = [r["diff"] for _, r in pts]
            err = [[r["diff"] - r["ci_low"] for _, r in pts], [r["ci_high"] - r["diff"] for _, r in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
            for x, (_, r) in zip(xs, pts):
                if r["best"]:
                    ax.annotate("best", (x, r["diff"]), textcoords="offset points", xytext=(4, 6))
        ax.axhline(0.0, color="grey", lw=1, ls="--")
        if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(f)
        ax.set_ylabel("avg accuracy diff vs baseline (points)")
        ax.set_title(f"{plan}: {f}")
        if len(groups) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "sweep.png", dpi=100)
    plt.close(fig)
    return ["sweep.png"]


def write_leaderboard(camp: Campaign, runs: list, store: Store, stages: Sequence[Stage] = STAGES,
                      run_id: str = "local") -> tuple[str, dict, str]:
    """Compute, write and commit the leaderboard; returns (key, board, status cached|built|partial).

    A complete leaderboard is committed under its content key; one with members missing is
    written to ``partial/campaign-<name>/<run_id>`` instead, so it is never taken for the final
    one (as the per-plan partial reports)."""
    key = report_key(camp, runs, stages)
    if store.check(key) == []:
        return key, json.loads((store.open(key) / "leaderboard.json").read_text()), "cached"
    board = compute(camp, runs, store, stages)
    status = "built"
    if board["incomplete"]:
        key, status = f"partial/campaign-{camp.name}/{run_id}", "partial"
        store.discard_staging(key)
        if store.check(key) is not None:
            store.quarantine(key, "superseded by a newer partial leaderboard")
    with store.staging(key) as st:
        plots = write_sweep_plot(board, st.path)
        board["plots"] = plots
        atomic_write_bytes(st.path / "leaderboard.json", (json.dumps(board, indent=2, allow_nan=False) + "\n").encode())
        atomic_write_bytes(st.path / "leaderboard.md", render_markdown(board, plots).encode())
        store.commit(key, {"stage": STAGE, "campaign": camp.name, "run_id": run_id, "partial": status == "partial",
                           "method": METHOD})
    return key, board, status
