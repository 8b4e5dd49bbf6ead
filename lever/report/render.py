"""Markdown rendering of a report dict (``build.build_report``).  Kept separate from the numbers
so the JSON stays the source of truth and the Markdown can change freely."""

from __future__ import annotations

from typing import Any, Optional

MISSING = "—"


def _f(x: Optional[float], nd: int = 2, sign: bool = False) -> str:
    if x is None:
        return MISSING
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


RULE_TEXT = {
    "strict": "regression when the CI's upper bound is more than {m} points below 0",
    "significant": "regression when the difference is more than {m} points below 0 and the CI excludes 0",
}


def _regression(reg: dict[str, Any]) -> list[str]:
    """The verdict `lever regress` reaches on this report (lever.report.regression)."""
    rule = reg.get("rule", "strict")
    head = (f"Regression check (rule `{rule}`: "
            + RULE_TEXT.get(rule, "{m}").format(m=reg.get("margin_points")) + "): ")
    if not reg.get("available", True):
        return [head + reg.get("reason", "verdict not available")]
    out = [head + (f"**REGRESSION** — {reg['reason']}" if reg["detected"] else "none")]
    for s in reg.get("shots", []):
        out.append(f"- shot {s['shot']}: {'REGRESSION' if s['regression'] else 'ok'} ({s['reason']})")
    out += [f"- note: {n}" for n in reg.get("notes", [])]
    return out


def _ci(p: Optional[dict]) -> str:
    if not p:
        return MISSING
    return f"{p['diff']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}]" + (" *" if p["significant"] else "")


def _references(rep: dict[str, Any]) -> list[str]:
    """Plan and baseline minus each reference row, per shot, with paired intervals."""
    refs = rep.get("reference_comparison") or {}
    if not any(refs.values()):
        return []
    shots = rep["shots"]
    rows = [[f"{name} − {ref}"] + [_ci(e["paired"]) for e in entries]
            for name, by_ref in refs.items() for ref, entries in by_ref.items()]
    return (["## Against the references", "",
             "Difference in points, with the paired bootstrap interval; `*` marks intervals that exclude 0.", ""]
            + _table(["rows"] + [f"shot {s}" for s in shots], rows) + [""])


def _conclusions(rep: dict[str, Any]) -> list[str]:
    """What the numbers can and cannot say at this n."""
    con = rep.get("conclusions")
    if not con or not rep.get("baseline_plan"):
        return []
    conf = int(rep["bootstrap"]["confidence"] * 100)
    L = ["## What this report can conclude", "",
         f"Plan vs baseline: n questions per shot, the width of the {conf}% interval, and the smallest "
         f"difference this n detects ({conf}% two-sided paired test, {int(con['power'] * 100)}% power, from the "
         "spread of the per-question differences). Differences well below it are not resolvable here; "
         "`—` means the two rows never differ on a question.", ""]
    L += _table(["shot", "n", "CI width (points)", "detectable difference (points)"],
                [[str(e["shot"]), str(e["n"]), _f(e["ci_width"]), _f(e["detectable_difference"])]
                 for e in con["per_shot"]])
    for s in con.get("identical_icds_shots", []):
        L.append("")
        L.append(f"- shot {s}: plan and baseline chose **identical ICD sequences** for every question, so their "
                 "difference is 0 by construction; this says nothing about whether the plan's training helped.")
    L.append("")
    return L


def _online(on: Optional[dict[str, Any]]) -> list[str]:
    """Online GRPO: the held-out reward of the policy's own samples per epoch (epoch 0 = the
    starting policy) and what each epoch's rollouts cost."""
    if not on:
        return []
    L = ["## Online rollouts", "",
         "Held-out reward = mean reward of the policy's own samples on held-out queries, judged by the LVLM "
         "(same draws every epoch); rollout reward = the sampled training groups; judgements new = LVLM, "
         "cached = judged-sequence cache.", ""]
    st = on.get("start") or {}
    rows = [["0", _f(st.get("heldout_reward"), 4), _f(st.get("heldout_correct"), 3), _f(st.get("heldout_greedy_reward"), 4)]
            + [""] * 7]
    for e in on.get("epochs", []):
        rows.append([str(e["epoch"]), _f(e.get("heldout_reward"), 4), _f(e.get("heldout_correct"), 3),
                     _f(e.get("heldout_greedy_reward"), 4), _f(e.get("rollout_reward"), 4),
                     _f(e.get("zero_std_frac"), 3), _f(e.get("judged_new"), 0), _f(e.get("judged_cached"), 0),
                     _f(e.get("lvlm_calls"), 0), _f(e.get("judge_seconds"), 1), _f(e.get("optimize_seconds"), 1)])
    L += _table(["epoch", "held-out reward", "held-out correct", "held-out greedy", "rollout reward",
                 "zero-var groups", "judged new", "judged cached", "LVLM calls", "judge s", "optimize s"], rows)
    L.append("")
    return L


def render_markdown(rep: dict[str, Any], plots: list[str]) -> str:
    L: list[str] = []
    L.append(f"# Lever report: {rep['plan']}" + (f" vs {rep['baseline_plan']}" if rep["baseline_plan"] else ""))
    L.append("")
    if rep.get("description"):
        L.append(f"_{rep['description']}_")
        L.append("")
    if rep["partial"]:
        L.append("> **Partial report.** Some inputs are missing; sections without data are marked "
                 f"{MISSING}.")
        for m in rep["missing"][:50]:
            L.append(f"> - missing: `{m}`")
        for m in rep["incomplete_cells"][:50]:
            L.append(f"> - incomplete: {m}")
        L.append("")
    L.append("## Accuracy per shot (VQA accuracy, %)")
    L.append("")
    names = list(rep["accuracy"])
    has_base = rep["baseline_plan"] is not None
    header = ["shot"] + names + (["diff", f"{int(rep['bootstrap']['confidence'] * 100)}% CI (paired bootstrap)", "n"] if has_base else ["n"])
    rows = []
    for c in rep["comparison"]:
        s = str(c["shot"])
        row = [s] + [_f(rep["accuracy"][n][s]) for n in names]
        if has_base:
            p = c["paired"]
            ci = f"[{p['low']:+.2f}, {p['high']:+.2f}]" + (" *" if p["significant"] else "") if p else MISSING
            row += [_f(c["diff"], sign=True), ci, str(p["n"]) if p else MISSING]
        else:
            row += [str(rep["n"]["plan"][s])]
        rows.append(row)
    avg_row = ["avg"] + [_f(rep["average"][n]) for n in names]
    if has_base:
        avg_row += [_f(rep["average_diff"], sign=True), "", ""]
    else:
        avg_row += [""]
    rows.append(avg_row)
    L += _table(header, rows)
    L.append("")
    if has_base:
        L.append(f"Shots improved over the baseline: **{rep['shots_improved']} / {rep['shots_compared']}**. "
                 "`*` marks intervals that exclude 0.")
        L += _regression(rep["regression"])
        L.append("")
    L += _conclusions(rep)
    L += _references(rep)
    L.append("## Chosen checkpoint")
    L.append("")
    ck = rep.get("checkpoint")
    if ck:
        L.append(f"`{ck.get('checkpoint')}` (stage {ck.get('stage')}, epoch {ck.get('epoch')}, strategy "
                 f"`{ck.get('strategy')}`): {ck.get('reason', '')}")
    else:
        L.append(MISSING)
    ep = rep.get("epoch_checkpoints") or {}
    if ep.get("requested"):
        L.append("")
        L.append("GRPO epoch checkpoints evaluated beside it (`checkpoint.evaluate_epochs`; columns "
                 + ", ".join(f"`{r}`" for r in ep.get("rows", [])) + " above):")
        L.append("")
        names = ep.get("rows", [])
        if names:
            L += _table(["epoch"] + [f"shot {s}" for s in rep["shots"]] + ["avg"],
                        [[n.removeprefix("epoch")] + [_f(rep["accuracy"][n][str(s)]) for s in rep["shots"]]
                         + [_f(rep["average"].get(n))] for n in names])
        if ep.get("not_trained"):
            L.append("")
            L.append(f"Not evaluated: epoch(s) {', '.join(map(str, ep['not_trained']))} (the plan trains "
                     f"{ep.get('grpo_epochs')} GRPO epoch(s)).")
        for e, why in sorted((ep.get("stopped") or {}).items(), key=lambda kv: int(kv[0])):
            L.append("")
            L.append(f"Not evaluated: epoch {e}, never trained ({why}).")
    L.append("")
    L.append("## Training curves")
    L.append("")
    tr = rep.get("training") or {}
    if any(tr.values()):
        cols = ["val_loss", "kl", "kl_exact", "ppo_loss", "adv_std", "val_reward"]
        rows = []
        for phase, curve in tr.items():
            for e in curve:
                rows.append([phase, str(e["epoch"])] + [_f(e.get(k), 4) for k in cols])
        L += _table(["phase", "epoch"] + cols, rows)
    else:
        L.append(MISSING + " (no training metrics)")
    L.append("")
    L += _online(rep.get("online_rollouts"))
    L.append("## ICD overlap with the baseline")
    L.append("")
    ov = rep.get("icd_overlap") or {}
    if ov and any(v for v in ov.values()):
        rows = [[s, str(v["n"]), _f(v["identical_set_share"] * 100 if v["identical_set_share"] is not None else None, 1),
                 _f(v["identical_sequence_share"] * 100 if v["identical_sequence_share"] is not None else None, 1),
                 _f(v["mean_jaccard"], 3)] if v else [s, MISSING, MISSING, MISSING, MISSING] for s, v in ov.items()]
        L += _table(["shot", "queries", "identical ICD set %", "identical sequence %", "mean Jaccard"], rows)
    else:
        L.append(MISSING)
    L.append("")
    L.append("## RL data diagnostics")
    L.append("")
    rd = rep.get("reward_data")
    if rd:
        rw = rd["reward"]
        L.append(f"- queries: {rd['queries']}, candidates: {rd['candidates']} (group size {rd['group_size']['min']}–"
                 f"{rd['group_size']['max']}, mean {rd['group_size']['mean']})")
        L.append(f"- correct candidates: {_f(rd['correct_share'] * 100 if rd['correct_share'] is not None else None, 1)}%")
        L.append(f"- reward (`{rd['reward_mode']}`): mean {_f(rw['mean'], 3)}, std {_f(rw['std'], 3)}, "
                 f"min {_f(rw['min'], 3)}, max {_f(rw['max'], 3)}, quartiles {rw['quantiles']}")
        L.append(f"- zero-variance groups: {rd['zero_variance_groups']} "
                 f"({_f(rd['zero_variance_share'] * 100 if rd['zero_variance_share'] is not None else None, 1)}%)")
        qb = rd["quality_buckets"]
        L.append(f"- quality buckets: high {qb['high']}, medium {qb['medium']}, low {qb['low']}")
    else:
        L.append(MISSING)
    L.append("")
    L.append("## Failed LVLM evaluations")
    L.append("")
    fe = rep["failed_evaluations"]
    L.append("- predictions (excluded from the accuracies): " + ", ".join(f"{k} {v}" for k, v in fe["predictions"].items()))
    L.append(f"- RL data candidates (excluded from training): {fe['rl_data'] if fe['rl_data'] is not None else MISSING}")
    L.append("")
    if plots:
        L.append("## Plots")
        L.append("")
        for p in plots:
            L.append(f"![{p}]({p})")
        L.append("")
    return "\n".join(L)
