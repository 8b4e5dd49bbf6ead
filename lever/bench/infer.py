"""``lever bench infer``: one-query-at-a-time greedy generation vs the batched path of ``infer``.

Both paths run in one process on the same prompts with ONE loaded LVLM (``build_lvlm`` caches it
per config, so every shot below -- like every per-shot unit a worker or pod runs -- shares it):

* plain: ``lvlm.generate([prompt])`` per query, the way a straightforward evaluation loop works;
* fast: ``lvlm.generate(prompts)``, what the infer stage calls: queries sorted by length and
  batched ``lvlm.batch_size`` at a time with left padding and padding-aware 3-D rotary positions,
  so every query gets exactly the tokens it gets alone.

We check that the generated texts are identical, print the throughput of both paths in queries
per second and their ratio per shot, and end with ``speedup: X.XX`` over all shots.  Timing:
per block of ``batch_size`` queries, the best of a few consecutive runs of each path, summed
over blocks; image preprocessing, done once per image per process by both paths, is outside
the timed region.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lever.config.schema import LVLMConfig
from lever.models.prompting import Example, icd_example, query_example


@dataclass
class InferBenchResult:
    shot: int
    queries: int
    plain_s: float
    fast_s: float
    identical: int  # queries whose generations are equal in both paths

    @property
    def speedup(self) -> float:
        return self.plain_s / self.fast_s if self.fast_s > 0 else float("inf")


def _clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def bench_shot(lvlm: Any, prompts: list[list[Example]], max_new_tokens: int, repeats: int = 3,
               shot: int = 0) -> InferBenchResult:
    """Time both paths on ``prompts`` and compare the texts.

    The queries go in blocks of ``lvlm.batch_size`` in query order -- exactly the calls the infer
    stage makes.  Per block each path runs ``repeats`` times in a row and keeps its best time
    (the two back to back, which goes first alternating by block); totals are sums over blocks,
    so a burst of load from a neighbour process cannot land on one path only."""
    plain_t, fast_t = 0.0, 0.0
    plain: list[str] = []
    fast: list[str] = []
    step = max(1, lvlm.batch_size)
    for b0 in range(0, len(prompts), step):
        block = prompts[b0:b0 + step]
        best_p, best_f = float("inf"), float("inf")
        for path in (("plain", "fast") if (b0 // step) % 2 == 0 else ("fast", "plain")):
            for _ in range(max(1, repeats)):
                lvlm._prompt_ids.clear()  # tokenization is paid inside both timings
                t = _clock()
                if path == "plain":
                    out_p = [lvlm.generate([p], max_new_tokens=max_new_tokens)[0] for p in block]
                    best_p = min(best_p, _clock() - t)
                else:
                    out_f = lvlm.generate(block, max_new_tokens=max_new_tokens)
                    best_f = min(best_f, _clock() - t)
        plain_t += best_p
        fast_t += best_f
        plain += out_p
        fast += out_f
    same = sum(1 for a, b in zip(plain, fast) if a == b)
    return InferBenchResult(shot, len(prompts), plain_t, fast_t, same)


def run_infer_bench(
    lvlm_cfg: LVLMConfig,
    *,
    shots: tuple[int, ...] = (0, 1, 2, 4),
    n_queries: int = 48,
    n_train: int = 96,
    image_size: int = 56,
    seed: int = 0,
    repeats: int = 3,
    max_new_tokens: int | None = None,
    echo: Callable[[str], None] = print,
) -> list[InferBenchResult]:
    """Every shot on the same queries (ICDs drawn at random from the train items, seeded);
    prints a table, the agreement line and ``speedup: X.XX`` (total plain time / total fast time)."""
    from lever.models.factory import _CACHE, build_lvlm
    from lever.bench.scoring import _synthetic_records

    n_new = max_new_tokens or lvlm_cfg.max_new_tokens
    with tempfile.TemporaryDirectory(prefix="lever-bench-") as tmp:
        records = _synthetic_records(n_train + n_queries, image_size, seed, Path(tmp))
        train, queries = records[:n_train], records[n_train:n_train + n_queries]
        rng = random.Random(seed)
        picks = [rng.sample(range(len(train)), max(shots)) for _ in queries]
        loads_before = len(_CACHE)
        lvlm = build_lvlm(lvlm_cfg)
        all_prompts = {s: [[icd_example(train[i]) for i in p[:s]] + [query_example(q)] for p, q in zip(picks, queries)]
                       for s in shots}
        for ps in all_prompts.values():  # image preprocessing once per image, as in a long stage
            for p in ps:
                lvlm.encode(p)
        bench_shot(lvlm, all_prompts[shots[0]][:4], n_new, repeats=1)  # warm up kernels
        echo(f"device={lvlm.device} dtype={lvlm.dtype} model={lvlm_cfg.kind} queries/shot={len(queries)} "
             f"batch_size={lvlm.batch_size} max_new_tokens={n_new}")
        echo(f"{'shot':>4} {'queries':>8} {'plain q/s':>10} {'fast q/s':>10} {'ratio':>7} {'identical':>10}")
        out = []
        for s in shots:
            # the same loaded model for every shot: what per-shot infer units share in a worker/pod
            if build_lvlm(lvlm_cfg) is not lvlm:  # pragma: no cover - the cache is the contract
                raise AssertionError("build_lvlm returned a second model for the same config")
            r = bench_shot(lvlm, all_prompts[s], n_new, repeats, shot=s)
            out.append(r)
            echo(f"{s:>4} {r.queries:>8} {r.queries / r.plain_s:>10.1f} {r.queries / r.fast_s:>10.1f} "
                 f"{r.speedup:>7.2f} {r.identical:>5}/{r.queries:<4}")
        loads = len(_CACHE) - loads_before
    same = sum(r.identical for r in out)
    total = sum(r.queries for r in out)
    echo(f"models: 1 LVLM instance shared by all {len(shots)} shots ({loads} loaded by this run)")
    echo(f"agreement: {same}/{total} generations identical ({'ok' if same == total else 'MISMATCH'})")
    plain_s = sum(r.plain_s for r in out)
    fast_s = sum(r.fast_s for r in out)
    echo(f"throughput: plain {total / plain_s:.1f} q/s, fast {total / fast_s:.1f} q/s")
    echo(f"speedup: {plain_s / fast_s:.2f}")
    return out
