"""``lever campaign run``: every member (at every seed) through the local runner, one store.

Members run one after another, each with its baseline, all on one worker pool (workers load the
LVLM once for the whole campaign).  Sharing needs no campaign-specific code: a unit's key depends
only on what it reads, so the upstream units members have in common (data, embeddings, beams,
v2, RL data, RCE, reference inferences, the baseline) have one key and are built by the first
member that needs them and found in the store by the others.  The runner builds each unit under
its store lease (``lever.storage.lease``), so two campaign processes, or a campaign and a
``lever run`` on the same store, still build every unit once.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from lever.campaign.loader import Campaign
from lever.pipeline.graph import STAGES, Stage
from lever.pipeline.runner import WorkerPool, default_jobs, gpu_count, new_run_id, run_plan
from lever.storage.store import Store


@dataclass
class CampaignSummary:
    run_id: str
    #: (member label, built, cached) per member run
    members: list[tuple[str, int, int]] = field(default_factory=list)
    unique: int = 0          # distinct units the campaign needs
    built: int = 0           # built (or rebuilt) by this run
    reused: int = 0          # found in the store when needed (earlier runs or an earlier member)
    shared: int = 0          # needed by two or more member runs
    built_keys: list[str] = field(default_factory=list)
    seconds: float = 0.0
    leaderboard: Optional[str] = None
    board: Optional[dict] = None
    status: str = ""


def run_campaign(camp: Campaign, runs: list, store: Store, *, stages: Sequence[Stage] = STAGES,
                 jobs: Optional[int] = None, console: Any = None, run_id: Optional[str] = None,
                 report: bool = True) -> CampaignSummary:
    t0 = time.monotonic()
    summary = CampaignSummary(run_id or new_run_id())
    if not runs:
        return summary
    first = runs[0][2]
    jobs = jobs or default_jobs(first)
    pool = WorkerPool(jobs, gpus=gpu_count(first) if first.lvlm.device in ("cuda", "auto") else 0)
    status: dict[str, str] = {}
    users: Counter[str] = Counter()
    try:
        for i, (member, seed, plan, base) in enumerate(runs, 1):
            label = member.name + (f" (seed {seed})" if seed is not None else "")
            if console is not None:
                console.print(f"[bold]campaign {camp.name}: member {i}/{len(runs)}: {label}[/bold]", highlight=False)
            res = run_plan(plan, store, baseline=base, stages=stages, jobs=jobs, run_id=summary.run_id,
                           console=console, pool=pool).results
            keys: dict[str, str] = {}
            for r in res:  # a key can appear twice (the baseline built it, the plan found it): built wins
                if keys.get(r.key) not in ("built", "rebuilt"):
                    keys[r.key] = r.status
            for k, s in keys.items():
                users[k] += 1
                if s in ("built", "rebuilt"):
                    status[k] = "built"
                else:
                    status.setdefault(k, "cached")
            built = sum(1 for s in keys.values() if s in ("built", "rebuilt"))
            summary.members.append((label, built, len(keys) - built))
    finally:
        pool.close()
    summary.unique = len(status)
    summary.built_keys = sorted(k for k, s in status.items() if s == "built")
    summary.built = len(summary.built_keys)
    summary.reused = summary.unique - summary.built
    summary.shared = sum(1 for k in status if users[k] > 1)
    if report:
        from lever.campaign.report import write_leaderboard

        key, board, st = write_leaderboard(camp, runs, store, stages, run_id=summary.run_id)
        summary.leaderboard = store.location(key, "leaderboard.md")
        summary.board, summary.status = board, st
    summary.seconds = time.monotonic() - t0
    return summary
