"""The ``summarize`` stage: report.md, report.json and plots/ for a plan against its baseline."""

from __future__ import annotations

import json

from lever.context import StageContext
from lever.io import atomic_write_bytes
from lever.report.build import build_report
from lever.report.plots import write_plots
from lever.report.render import render_markdown


def summarize(ctx: StageContext) -> None:
    rep = build_report(ctx.plan, ctx.baseline_plan, ctx.inputs, ctx.baseline_inputs,
                       partial=ctx.partial, missing=ctx.missing)
    rewards = (rep.get("reward_data") or {}).pop("_rewards", []) if rep.get("reward_data") else []
    rep["run_id"] = ctx.run_id
    plots = write_plots(rep, rewards, ctx.out / "plots")
    rep["plots"] = plots
    atomic_write_bytes(ctx.out / "report.json", (json.dumps(rep, indent=2, allow_nan=False) + "\n").encode())
    atomic_write_bytes(ctx.out / "report.md", render_markdown(rep, plots).encode())
    _telemetry(ctx, rep)
    ctx.log.info("report written: %s", ctx.out / "report.md")


def _telemetry(ctx: StageContext, rep: dict) -> None:
    """Per-shot accuracy gauges of the plan, its references and evaluated epochs.  No nightly
    gauges: ``lever regress`` (lever.report.regression.push_gauges) is their only producer, so
    the alert and the nightly's exit code cannot disagree."""
    for name, per_shot in rep["accuracy"].items():
        variant = "selector" if name == "plan" else name
        if name == "baseline":
            continue
        for shot, acc in per_shot.items():
            if acc is not None:
                ctx.telemetry.accuracy(variant, int(shot), acc / 100.0)
