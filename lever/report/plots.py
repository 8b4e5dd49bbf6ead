"""PNG plots of a report (matplotlib, Agg backend: no display on pods or CI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(rep: dict[str, Any], rewards: list[float], out: Path) -> list[str]:
    """Write every plot the data allows; return paths relative to ``out``."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    made: list[str] = []
    shots = rep["shots"]

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, acc in rep["accuracy"].items():
        ys = [acc[str(s)] for s in shots]
        if any(y is not None for y in ys):
            ax.plot(shots, [float("nan") if y is None else y for y in ys], marker="o", label=name)
    ax.set_xlabel("shots")
    ax.set_ylabel("VQA accuracy (%)")
    ax.set_xticks(shots)
    ax.set_title(f"{rep['plan']}: accuracy per shot")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)
    made.append("plots/accuracy.png")

    comp = [c for c in rep["comparison"] if c.get("paired")]
    if comp:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [c["shot"] for c in comp]
        ys = [c["paired"]["diff"] for c in comp]
        lo = [c["paired"]["diff"] - c["paired"]["low"] for c in comp]
        hi = [c["paired"]["high"] - c["paired"]["diff"] for c in comp]
        ax.bar(xs, ys, color=["tab:green" if y >= 0 else "tab:red" for y in ys])
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor="black", capsize=4)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(xs)
        ax.set_xlabel("shots")
        ax.set_ylabel("plan - baseline (points)")
        ax.set_title(f"difference with {int(rep['bootstrap']['confidence'] * 100)}% paired bootstrap CI")
        fig.tight_layout()
        fig.savefig(out / "difference.png", dpi=100)
        plt.close(fig)
        made.append("plots/difference.png")

    curves = [e for phase in ("rce", "grpo") for e in (rep.get("training") or {}).get(phase, [])]
    if curves:
        fig, axes = plt.subplots(2, 2, figsize=(9, 6))
        for ax, key in zip(axes.flat, ("val_loss", "kl", "ppo_loss", "adv_std")):
            for phase in ("rce", "grpo"):
                pts = [(i, e[key]) for i, e in enumerate(curves, 1) if e["phase"] == phase and e.get(key) is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=phase)
            ax.set_title(key)
            ax.set_xlabel("epoch (RCE then GRPO)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.tight_layout()
        fig.savefig(out / "training.png", dpi=100)
        plt.close(fig)
        made.append("plots/training.png")

    on = rep.get("online_rollouts")
    if on and on.get("epochs"):
        fig, ax = plt.subplots(figsize=(6, 4))
        start = (on.get("start") or {}).get("heldout_reward")
        pts = ([(0, start)] if start is not None else []) + [
            (e["epoch"], e["heldout_reward"]) for e in on["epochs"] if e.get("heldout_reward") is not None]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker=".", label="held-out (own samples)")
        roll = [(e["epoch"], e["rollout_reward"]) for e in on["epochs"] if e.get("rollout_reward") is not None]
        ax.plot([x for x, _ in roll], [y for _, y in roll], marker=".", alpha=0.6, label="rollouts (train groups)")
        ax.set_xlabel("GRPO epoch (0 = start)")
        ax.set_ylabel("mean reward")
        ax.set_title("online GRPO: reward of the policy's own samples")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "online.png", dpi=100)
        plt.close(fig)
        made.append("plots/online.png")

    if rewards:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(rewards, bins=20, color="tab:blue")
        ax.set_xlabel("reward")
        ax.set_ylabel("candidates")
        ax.set_title("RL data reward distribution")
        fig.tight_layout()
        fig.savefig(out / "rewards.png", dpi=100)
        plt.close(fig)
        made.append("plots/rewards.png")
    return made
