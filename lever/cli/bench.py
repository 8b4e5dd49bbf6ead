"""CLI commands: ``lever bench ...`` (implementations live beside the code they measure)."""

from __future__ import annotations

from typing import Optional

import typer

from lever.cli.app import app

bench_app = typer.Typer(help="Benchmarks: reference path vs fast path on the same inputs.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


@bench_app.command("scoring")
def bench_scoring(
    plan: str = typer.Option("baseline", help="plan whose lvlm section is benchmarked"),
    profile: Optional[str] = typer.Option("tiny", help="profile (tiny: offline tiny Qwen2.5-VL)"),
    queries: int = typer.Option(2, min=1, help="queries per setting"),
    ks: str = typer.Option("16,32,64", help="pool sizes K for the growth table"),
    shots: str = typer.Option("1,2,3,4", help="shots S for the growth table (at the reference K, B)"),
    ref: str = typer.Option("64,5,2", help="reference K,B,S of the final speedup line"),
    repeats: int = typer.Option(5, min=1, help="rounds of two timed replays per path and query (best is kept)"),
) -> None:
    """InfoScore scoring, plain vs fast: agreement, throughput, ratio; ends with ``speedup: X.XX``."""
    from lever.config import load_plan
    from lever.bench.scoring import run_scoring_bench

    cfg = load_plan(plan, profile=profile).lvlm
    k0, b0, s0 = _ints(ref)
    run_scoring_bench(cfg, ref=(k0, b0, s0), ks=_ints(ks), shots=_ints(shots), n_queries=queries,
                      repeats=repeats, echo=typer.echo)


@bench_app.command("infer")
def bench_infer(
    plan: str = typer.Option("baseline", help="plan whose lvlm section is benchmarked"),
    profile: Optional[str] = typer.Option("tiny", help="profile (tiny: offline tiny Qwen2.5-VL)"),
    queries: int = typer.Option(48, min=1, help="eval queries per shot"),
    shots: str = typer.Option("0,1,2,4", help="shots to run (all share one loaded model)"),
    repeats: int = typer.Option(3, min=1, help="timed runs per path (best is kept)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="default: the plan's lvlm.max_new_tokens"),
) -> None:
    """Greedy generation, one query at a time vs batched (the infer stage's path): identical
    answers, throughput, ratio; ends with ``speedup: X.XX``."""
    from lever.config import load_plan
    from lever.bench.infer import run_infer_bench

    cfg = load_plan(plan, profile=profile).lvlm
    run_infer_bench(cfg, shots=_ints(shots), n_queries=queries, repeats=repeats,
                    max_new_tokens=max_new_tokens, echo=typer.echo)


@bench_app.command("verdicts")
def bench_verdicts(
    plan: str = typer.Option("baseline", help="plan whose lvlm section is benchmarked"),
    profile: Optional[str] = typer.Option("tiny", help="profile (tiny: offline tiny Qwen2.5-VL)"),
    queries: int = typer.Option(8, min=1, help="queries (candidate groups)"),
    candidates: int = typer.Option(18, min=1, help="candidate sequences per query"),
    shots: int = typer.Option(2, min=0, help="ICDs per candidate"),
    repeats: int = typer.Option(5, min=1, help="timed rounds per query (best is kept)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="default: the plan's lvlm.max_new_tokens"),
) -> None:
    """RL data's verdicts (generation + gt answer scoring): plain, two-pass fast and one-pass fast;
    identical generations, ms per query, ratios; ends with ``speedup: X.XX`` (plain / one-pass)."""
    from lever.config import load_plan
    from lever.bench.verdicts import run_verdict_bench

    cfg = load_plan(plan, profile=profile).lvlm
    run_verdict_bench(cfg, n_queries=queries, candidates=candidates, shots=shots, repeats=repeats,
                      max_new_tokens=max_new_tokens, echo=typer.echo)
