"""``lever bench verdicts``: the LVLM work of RL data's candidate verdicts, three ways.

Every RL-data candidate needs a greedy generation (its verdict) and the probability of each
distinct gt answer (``gt_prob``).  On the same candidate groups, in one process, this times

* plain: ``lvlm.generate`` + the plain scorer (``lvlm.fast: false``);
* two-pass: ``lvlm.generate`` + the fast scorer (the fast path before one-pass verdicts);
* one-pass: ``FastScorer.generate_and_score``, what generate-rl-data runs by default: the
  answers are scored on the generation's own key/value cache.

It checks that the three give identical generations and the same answer probabilities (largest
difference printed), prints milliseconds per query and the ratios, and ends with
``speedup: X.XX`` (plain / one-pass).  Timing as in ``lever bench scoring``: per query, rounds
that alternate the order of the paths, best time per path, summed over queries; image
preprocessing is outside the timed region, tokenization inside.
"""

from __future__ import annotations

import math
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

from lever.config.schema import LVLMConfig
from lever.models.prompting import Example, answer_weights, icd_example, query_example


def _paths(lvlm: Any, max_new_tokens: int) -> dict[str, Callable[[list[list[Example]], list[str]], tuple[list[str], list[list[float]]]]]:
    """name -> (prompts, names) -> (generations, per-prompt answer probabilities)."""
    from lever.models.fast_scoring import FastScorer

    def separate(score: Callable) -> Callable:
        def run(prompts: list[list[Example]], names: list[str]):
            texts = lvlm.generate(prompts, max_new_tokens)
            flat = score([p for p in prompts for _ in names], [a for _ in prompts for a in names])
            return texts, [flat[i * len(names):(i + 1) * len(names)] for i in range(len(prompts))]
        return run

    def plain(ps, ans):
        return [math.exp(x) for x in lvlm.answer_logprob(ps, ans)]

    def two_pass(ps, ans):
        return FastScorer(lvlm)(ps, ans)

    def one_pass(prompts, names):
        texts, lps = FastScorer(lvlm).generate_and_score(prompts, [names] * len(prompts), max_new_tokens)
        return texts, [[math.exp(x) for x in lp] for lp in lps]

    return {"plain": separate(plain), "two-pass": separate(two_pass), "one-pass": one_pass}


def run_verdict_bench(
    lvlm_cfg: LVLMConfig,
    *,
    n_queries: int = 8,
    candidates: int = 18,
    shots: int = 2,
    n_train: int = 96,
    image_size: int = 56,
    seed: int = 0,
    repeats: int = 5,
    max_new_tokens: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, float]:
    """Seconds per path over all queries (best per query, summed); prints the table, the
    agreement line and ``speedup:``."""
    from lever.models.factory import build_lvlm
    from lever.bench.scoring import _clock, _synthetic_records

    n_new = max_new_tokens or lvlm_cfg.max_new_tokens
    lvlm = build_lvlm(lvlm_cfg)
    paths = _paths(lvlm, n_new)
    with tempfile.TemporaryDirectory(prefix="lever-bench-") as tmp:
        records = _synthetic_records(n_train + n_queries, image_size, seed, Path(tmp))
        train, queries = records[:n_train], records[n_train:]
        rng = random.Random(seed)
        groups = []
        for q in queries:
            prompts = [[icd_example(train[i]) for i in rng.sample(range(len(train)), shots)] + [query_example(q)]
                       for _ in range(candidates)]
            for p in prompts:  # image preprocessing once per image, as in a long stage
                lvlm.encode(p)
            groups.append((prompts, [a for a, _ in answer_weights(q.answers)]))
        paths["one-pass"](*groups[0])  # warm up kernels
        best = {name: 0.0 for name in paths}
        outs: dict[str, list] = {name: [] for name in paths}
        for gi, (prompts, names) in enumerate(groups):
            t_best = {name: float("inf") for name in paths}
            last: dict[str, Any] = {}
            order = list(paths)
            for rep in range(max(1, repeats)):
                for name in (order if (gi + rep) % 2 == 0 else order[::-1]):
                    lvlm._prompt_ids.clear()
                    t = _clock()
                    last[name] = paths[name](prompts, names)
                    t_best[name] = min(t_best[name], _clock() - t)
            for name in paths:
                best[name] += t_best[name]
                outs[name].append(last[name])
    ref_t, ref_p = zip(*outs["plain"])
    same = {name: sum(a == b for g1, g2 in zip(ref_t, [o[0] for o in outs[name]]) for a, b in zip(g1, g2))
            for name in paths}
    diff = max(abs(x - y) for name in paths for g1, g2 in zip(ref_p, [o[1] for o in outs[name]])
               for r1, r2 in zip(g1, g2) for x, y in zip(r1, r2))
    n_cand = n_queries * candidates
    echo(f"device={lvlm.device} dtype={lvlm.dtype} model={lvlm_cfg.kind} queries={n_queries} "
         f"candidates/query={candidates} shots={shots} max_new_tokens={n_new}")
    echo(f"{'path':>9} {'ms/query':>9} {'vs plain':>9} {'identical':>10}")
    for name in paths:
        echo(f"{name:>9} {1e3 * best[name] / n_queries:>9.1f} {best['plain'] / best[name]:>9.2f} "
             f"{same[name]:>5}/{n_cand:<4}")
    ok = all(v == n_cand for v in same.values()) and diff <= 1e-4
    echo(f"agreement: {min(same.values())}/{n_cand} generations identical, max abs answer-probability "
         f"difference {diff:.2e} ({'ok' if ok else 'MISMATCH'})")
    echo(f"one-pass vs two-pass: {best['two-pass'] / best['one-pass']:.2f}x")
    echo(f"speedup: {best['plain'] / best['one-pass']:.2f}")
    return best
