"""A brief, seeded warm-up fine-tune of the tiny Qwen2.5-VL on synthetic in-context QA.

Why: a randomly initialised LVLM answers every question wrong (it emits the same filler token),
so every RL candidate would be incorrect and rewards would have zero variance; the RL stages
would then have nothing to learn from.  A few hundred steps on synthetic shape/colour/count
questions (drawn with the project's own generator, under a seed distinct from the dataset's)
teach it the answer format and some of the answers.  Half the training prompts carry ICDs of the
same question type, so which ICDs are shown changes the model's answer -- the signal InfoScore
and the selector are about.

The result is cached on disk (``$LEVER_CACHE_DIR`` or ``~/.cache/lever``), keyed by a hash of
every setting that shapes it, and written atomically, so each machine pays the cost once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

WARMUP_VERSION = 2
BATCH = 16
LR = 3e-3
N_ITEMS = 256
IMAGE_SIZE = 56


def cache_dir() -> Path:
    return Path(os.environ.get("LEVER_CACHE_DIR") or Path.home() / ".cache" / "lever") / "tiny_qwen"


def warmup_key(cfg: Any, vocab_size: int) -> str:
    import transformers

    spec = {
        "v": WARMUP_VERSION, "seed": cfg.seed, "steps": cfg.warmup_steps, "min_pixels": cfg.min_pixels,
        "max_pixels": cfg.max_pixels, "vocab": vocab_size, "batch": BATCH, "lr": LR, "items": N_ITEMS,
        "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _training_items(seed: int) -> list[tuple[Any, str, list[str], str]]:
    """(image, question, raw answers, question type) of a private synthetic split."""
    from lever.data.synthetic import generate_split

    q_json, a_json, images = generate_split("train", N_ITEMS, IMAGE_SIZE, seed)
    anns = {a["question_id"]: a for a in a_json["annotations"]}
    out = []
    for q in q_json["questions"]:
        ann = anns[q["question_id"]]
        out.append((images[q["image_id"]], q["question"], [x["answer"] for x in ann["answers"]], ann["question_type"]))
    return out


def _pick_icds(rng: random.Random, qi: int, items: list, answers: list[str], by_answer: dict) -> list[int]:
    """ICDs of one training prompt.  Half the prompts hold an ICD of the same question type with
    the same answer (placed anywhere), the rest 0-2 random ICDs: the model learns that a matching
    demonstration is evidence, so the choice of ICDs changes its answers."""
    others = [j for j in range(len(items)) if j != qi]
    if rng.random() < 0.5:
        match = [j for j in by_answer[(items[qi][3], answers[qi])] if j != qi]
        if match:
            icds = [rng.choice(match)] + rng.sample(others, rng.choice((0, 1)))
            rng.shuffle(icds)
            return list(dict.fromkeys(icds))
    return rng.sample(others, rng.choice((0, 1, 2)))


def _train(model: Any, processor: Any, cfg: Any) -> None:
    from lever.models.lvlm import Encoded, QwenVLM
    from lever.models.prompting import Example, most_common_answer

    vlm = QwenVLM(model, processor, cfg, torch.device("cpu"), torch.float32)
    items = _training_items(cfg.seed + 7919)
    answers = [most_common_answer(it[2]) for it in items]
    by_answer: dict[tuple[str, str], list[int]] = {}
    for i, it in enumerate(items):
        by_answer.setdefault((it[3], answers[i]), []).append(i)
    rng = random.Random(cfg.seed)
    eos = processor.tokenizer.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / cfg.warmup_steps))
    model.train()
    t0 = time.time()
    for step in range(cfg.warmup_steps):
        batch: list[Encoded] = []
        for _ in range(BATCH):
            qi = rng.randrange(len(items))
            icds = _pick_icds(rng, qi, items, answers, by_answer)
            prompt = [Example(items[j][0], items[j][1], answers[j]) for j in icds]
            prompt.append(Example(items[qi][0], items[qi][1]))
            enc = vlm.encode(prompt, answers[qi])
            batch.append(Encoded(enc.ids + [eos], enc.answer_start, enc.images))
        inputs = vlm.collate(batch)
        keep = max(e.n_answer for e in batch) + 1
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            position_ids=vlm.position_ids(inputs), pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"), logits_to_keep=keep, use_cache=False,
        ).logits[:, :-1]
        targets = inputs["input_ids"][:, -(keep - 1):].clone()
        for row, e in enumerate(batch):  # only answer (+ end) tokens count
            targets[row, : targets.shape[1] - e.n_answer] = -100
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.warmup_steps - 1:
            log.info("tiny-qwen warm-up step %d/%d loss %.3f (%.0fs)", step + 1, cfg.warmup_steps, loss.item(), time.time() - t0)
    model.eval()


def apply_warmup(model: Any, processor: Any, cfg: Any) -> None:
    """Load the cached warm-up weights for these settings, or train them (seeded) and cache them."""
    from safetensors.torch import load_model, save_model

    path = cache_dir() / f"warmup-{warmup_key(cfg, model.config.text_config.vocab_size)}.safetensors"
    if path.exists():
        try:
            load_model(model, str(path))
            model.eval()
            return
        except Exception as e:  # noqa: BLE001 - a corrupt cache entry is rebuilt, not fatal
            log.warning("ignoring unreadable warm-up cache %s (%s)", path, e)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        _train(model, processor, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_model(model, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # reload what was written, so a fresh build and a cached build are bit-identical
    load_model(model, str(path))
    model.eval()
