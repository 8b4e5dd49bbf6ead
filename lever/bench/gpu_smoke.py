"""GPU smoke check: the cluster code route on one GPU in a few minutes (``scripts/gpu_smoke.sh``).

What a person with one GPU runs before trusting a cluster run, and what CI runs on CPU with
``--tiny``.  Each step is a thing the CPU tests cannot show on real hardware:

1. the processor: transformers' ``Qwen2_5_VLProcessor`` built from the model directory without a
   video processor (``lever.models.pretrained``);
2. the model from a local directory through the cluster route: real weights when ``--model DIR``
   is given (e.g. a mounted snapshot), else Qwen2.5-VL-3B's full architecture with random weights
   written in the hub layout first (``--tiny``: the tiny model, on CPU);
3. fast vs plain scoring of prompts with 0-4 images, in bf16, against the stated tolerance
   (``lever.models.fast_scoring.LOGPROB_TOLERANCE``);
4. batched vs one-by-one greedy generation;
5. one K=64, B=5, S=2 InfoScore beam query on the fast path: wall time, achieved TFLOP/s next to
   the cost model's assumption, and peak GPU memory.

Everything lands in one JSON file (``--out``); the exit status is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")


def _records(n: int, size: tuple[int, int], folder: Path, seed: int = 0) -> list[Any]:
    """``n`` dataset records with PIL-drawn JPEGs (COCO-sized in full mode)."""
    from PIL import Image, ImageDraw

    from lever.data.dataset import VQARecord

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        img = Image.new("RGB", size, (245, 245, 240))
        d = ImageDraw.Draw(img)
        w, h = size
        box = [rng.randint(0, w // 3), rng.randint(0, h // 3), w // 2 + rng.randint(0, w // 3), h // 2 + rng.randint(0, h // 3)]
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[color])
        path = folder / f"COCO_smoke_{i:012d}.jpg"
        img.save(path, quality=90)
        q, a = (("What color is the shape?", color) if i % 2 else ("What shape is shown?", shape))
        out.append(VQARecord(i, i, q, [a] * 10, path))
    return out


def log(msg: str) -> None:
    print(f"[gpu-smoke] {msg}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_dir(args: argparse.Namespace, work: Path, log) -> tuple[Path, str]:
    """The directory to load from, and what it holds."""
    from lever.models.hub_layout import export_qwen, export_tiny_qwen, qwen_3b_random

    if args.model:
        return Path(args.model), "weights from " + args.model
    if args.tiny:
        from lever.config import load_plan

        tiny = load_plan("baseline", "tiny").lvlm
        return export_tiny_qwen(work / "qwen", seed=tiny.seed, warmup_steps=tiny.warmup_steps), "tiny model (hub layout)"
    from lever.models.tiny_qwen import build_tokenizer

    tok = build_tokenizer()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log(f"building Qwen2.5-VL-3B's architecture with random weights on {device} ...")
    with torch.device(device):
        torch.manual_seed(0)
        model = qwen_3b_random(tok)
    model = model.to(torch.bfloat16)
    export_qwen(model, tok, work / "qwen-3b", dtype="bfloat16")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return work / "qwen-3b", "Qwen2.5-VL-3B architecture, random weights (hub layout)"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lever.config.schema import LVLMConfig
    from lever.bench.cost_model import H100_TFLOPS, beam_costs, flops, measure_lengths
    from lever.models.fast_scoring import LOGPROB_TOLERANCE, FastScorer
    from lever.models.factory import build_lvlm
    from lever.models.pretrained import load_qwen_processor
    from lever.models.prompting import icd_example, most_common_answer, query_example
    from lever.sampling.beam_search import infoscore_beam_search

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        log("no CUDA device: running the full-size check on CPU (slow; meant for a GPU)")
    dtype = "bfloat16"
    report: dict[str, Any] = {"device": str(device), "dtype": dtype, "tiny": bool(args.tiny), "checks": {}}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="lever-gpu-smoke-") as tmp:
        work = Path(tmp)
        directory, what = _model_dir(args, work, log)
        report["model"] = what
        # 1. processor
        from transformers import Qwen2_5_VLProcessor

        proc = load_qwen_processor(directory, args.min_pixels, args.max_pixels)
        report["processor"] = {"class": type(proc).__mro__[1].__name__, "tokenizer": type(proc.tokenizer).__name__,
                               "image_processor": type(proc.image_processor).__name__}
        report["checks"]["processor"] = isinstance(proc, Qwen2_5_VLProcessor)
        # 2. model through the cluster route
        cfg = LVLMConfig(kind="qwen2_5_vl", name=str(directory), revision=None, dtype=dtype, device=str(device),
                         min_pixels=args.min_pixels, max_pixels=args.max_pixels, batch_size=args.batch_size,
                         max_new_tokens=5)
        t0 = time.perf_counter()
        lvlm = build_lvlm(cfg, cache=False)
        _sync(device)
        report["load_s"] = round(time.perf_counter() - t0, 2)
        report["parameters"] = sum(p.numel() for p in lvlm.model.parameters())
        log(f"loaded {what} in {report['load_s']} s ({report['parameters'] / 1e9:.2f}B parameters)")
        size = (56, 56) if args.tiny else (640, 480)
        records = _records(args.pool + 8, size, work / "images")
        # 3. fast vs plain, 0-4 images per prompt
        rng = random.Random(1)
        prompts, answers = [], []
        for i in range(args.prompts):
            k = i % 5
            q = records[i]
            prompts.append([icd_example(r) for r in rng.sample(records[8:], k)] + [query_example(q)])
            answers.append(most_common_answer(q.answers))
        fast = FastScorer(lvlm).answer_logprob(prompts, answers)
        plain = lvlm.answer_logprob(prompts, answers)
        gaps = [abs(a - b) for a, b in zip(fast, plain)]
        tol = LOGPROB_TOLERANCE[dtype]
        by_images = {k: max(g for g, p in zip(gaps, prompts) if len(p) - 1 == k) for k in range(5)}
        report["scoring"] = {"prompts": len(prompts), "max_abs_logprob_gap": max(gaps), "tolerance": tol,
                             "max_gap_by_icds": by_images}
        report["checks"]["fast_vs_plain"] = max(gaps) < tol
        log(f"fast vs plain: max |log-prob gap| {max(gaps):.2e} (tolerance {tol:g})")
        # 4. batched vs one-by-one generation
        batched = lvlm.generate(prompts, 5)
        single = [lvlm.generate([p], 5)[0] for p in prompts]
        same = sum(a == b for a, b in zip(batched, single))
        report["generation"] = {"prompts": len(prompts), "identical": same,
                                "differing": [[a, b] for a, b in zip(batched, single) if a != b][:5]}
        report["checks"]["batched_vs_single"] = same >= 0.9 * len(prompts)
        log(f"batched vs one-by-one generation: {same}/{len(prompts)} identical")
        # 5. one K=64 beam query
        K, B, S = args.pool, 5, 2
        pool = [icd_example(r) for r in records[8:8 + K]]
        q = records[0]
        scorer = FastScorer(lvlm)
        scorer(prompts[:2], answers[:2])  # warm kernels and caches outside the timed query
        scorer.reset()
        _sync(device)
        t0 = time.perf_counter()
        infoscore_beam_search(scorer, query_example(q), most_common_answer(q.answers), pool, B, S)
        _sync(device)
        secs = time.perf_counter() - t0
        img = lvlm.process_image(records[0].image_path)
        patches = int(img.grid_thw.prod().item())
        cost = beam_costs(measure_lengths(lvlm, records[:16]), img.n_tokens, K, B, S)
        # the cost model's per-token and per-patch figures are Qwen2.5-VL-3B's: no TFLOP/s for the tiny model
        tf = None if args.tiny else flops(cost.fast_tokens, cost.fast_images, patches)
        report["beam_query"] = {"K": K, "B": B, "S": S, "seconds": round(secs, 3), "lm_tokens": cost.fast_tokens,
                                "images": cost.fast_images, "image_tokens": img.n_tokens, "patches_per_image": patches,
                                "model_tflop": tf, "achieved_tflops": tf / secs if tf and secs else None,
                                "cost_model_assumes_tflops": H100_TFLOPS,
                                "cost_model_seconds": tf / H100_TFLOPS if tf else None}
        log(f"K={K} beam query: {secs:.2f} s" + ("" if args.tiny else f", {tf / secs:.0f} TFLOP/s achieved "
                                                                   f"(cost model assumes {H100_TFLOPS:.0f})"))
        if device.type == "cuda":
            report["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            log(f"peak GPU memory {report['peak_gpu_memory_gib']} GiB")
    report["ok"] = all(report["checks"].values())
    return report


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_smoke", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="directory of a Qwen2.5-VL checkpoint in the hub layout (default: random 3B)")
    ap.add_argument("--tiny", action="store_true", help="the tiny model on CPU (what CI runs)")
    ap.add_argument("--out", default="gpu_smoke.json", help="JSON report path")
    ap.add_argument("--prompts", type=int, default=20, help="prompts for the scoring and generation checks")
    ap.add_argument("--pool", type=int, default=64, help="K of the timed beam query")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--min-pixels", type=int, default=3136)
    ap.add_argument("--max-pixels", type=int, default=448 * 448)
    args = ap.parse_args(argv)
    if args.tiny:
        args.max_pixels = min(args.max_pixels, 3136)
    report = run(args)
    from lever.io import atomic_write_json

    atomic_write_json(Path(args.out), report, indent=2)
    print(json.dumps({"ok": report["ok"], "checks": report["checks"], "out": args.out}))
    return 0 if report["ok"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
