"""A seeded warm-up fine-tune of the tiny Qwen2.5-VL on synthetic in-context QA.

Why: a randomly initialised LVLM answers every question wrong (it emits the same filler token),
so every RL candidate would be incorrect and no choice of demonstrations could matter.  The
warm-up teaches, on a private synthetic split (a seed distinct from the dataset's):

* ordinary shape/colour/count/background questions, with same-answer demonstrations in half of
  the prompts, so demonstrations are evidence;
* the planted "code word" task of :mod:`lever.data.synthetic`, under a colour -> word mapping
  drawn afresh for every prompt, so the only way to answer is to take the word most of the shown
  demonstrations carry (plurality copying) -- it can never memorise the evaluated mapping.
  Demonstrations of the query's colour show a wrong word with probability ``DEMO_NOISE``, which
  makes several agreeing demonstrations stronger evidence than one; every demonstration answer an
  earlier demonstration of its colour makes predictable is trained too (dense supervision: without
  it the copying took several times more steps to appear).

Measured on the tiny model (1,500 steps, about 3-5 minutes on 2 cores): one clean demonstration
of the query's colour gives the right word 100% of the time, two of three agreeing ones 90%, one
of two disagreeing ones about half (see docs/performance.md and the testbed section of README).

The result is cached on disk (``$LEVER_CACHE_DIR`` or ``~/.cache/lever``), keyed by a hash of
every setting that shapes it (the generator's version included), and written atomically; parallel
processes wait on a file lock for the one that trains, so each machine pays the cost once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lever.config.schema import LVLMConfig

log = logging.getLogger(__name__)

WARMUP_VERSION = 3
BATCH = 16
LR = 3e-3
N_ITEMS = 384
IMAGE_SIZE = 56
#: share of planted ("code word") questions in the warm-up's private split, and of planted prompts
PLANTED_FRACTION = 0.5
PLANTED_PROMPTS = 0.6
PLANTED_TYPE = "code"
#: probability that a planted demonstration shows a wrong word (teaches plurality over copying one)
DEMO_NOISE = 0.2


def cache_dir() -> Path:
    return Path(os.environ.get("LEVER_CACHE_DIR") or Path.home() / ".cache" / "lever") / "tiny_qwen"


def warmup_key(cfg: LVLMConfig, vocab_size: int) -> str:
    import transformers

    from lever.data.synthetic import GENERATOR_VERSION

    spec = {
        "v": WARMUP_VERSION, "seed": cfg.seed, "steps": cfg.warmup_steps, "min_pixels": cfg.min_pixels,
        "max_pixels": cfg.max_pixels, "vocab": vocab_size, "batch": BATCH, "lr": LR, "items": N_ITEMS,
        "planted": [PLANTED_FRACTION, PLANTED_PROMPTS, DEMO_NOISE], "generator": GENERATOR_VERSION,
        "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Item:
    image: Any
    question: str
    answer: str  # most common normalized answer (ordinary) -- unused for planted items
    qtype: str
    color: str


def _training_items(seed: int) -> list[_Item]:
    """A private synthetic split (its own seed, planted questions included)."""
    from lever.data.synthetic import generate_split
    from lever.models.prompting import most_common_answer

    q_json, a_json, images = generate_split("train", N_ITEMS, IMAGE_SIZE, seed, planted_fraction=PLANTED_FRACTION)
    anns = {a["question_id"]: a for a in a_json["annotations"]}
    out = []
    for q in q_json["questions"]:
        ann = anns[q["question_id"]]
        out.append(_Item(images[q["image_id"]], q["question"], most_common_answer([x["answer"] for x in ann["answers"]]),
                         ann["question_type"], ann["planted_value"]))
    return out


@dataclass
class _Prompt:
    """One warm-up prompt: ICD item ids, the query item, the answers shown and the target."""

    icds: list[int]
    query: int
    shown: list[str]  # the answer each ICD shows
    target: str


class _PromptMaker:
    """Draws warm-up prompts.

    Planted ("code word") prompts draw their own colour -> code word mapping, so the answer is
    never knowable from memory, only from the demonstrations: 1-4 demonstrations of the query's
    colour, each showing the mapped word or (with probability ``DEMO_NOISE``) another one, mixed
    with 0-2 distractors (planted questions of other colours, or ordinary ones).  The target is
    the mapped word, so the best the model can do is take the word most of the demonstrations
    carry: it learns plurality copying, which makes a demonstration's colour (what a selector
    chooses) decide the answer, and more matching demonstrations stronger evidence than one.
    Ordinary prompts keep the earlier recipe: 0-2 random demonstrations, and in half of them 1-3
    of the same question type and answer, so demonstrations are evidence there too.
    """

    def __init__(self, items: list[_Item], rng: random.Random) -> None:
        self.items, self.rng = items, rng
        self.planted = [i for i, it in enumerate(items) if it.qtype == PLANTED_TYPE]
        self.ordinary = [i for i, it in enumerate(items) if it.qtype != PLANTED_TYPE]
        self.by_color: dict[str, list[int]] = {}
        for i in self.planted:
            self.by_color.setdefault(items[i].color, []).append(i)
        self.by_answer: dict[tuple[str, str], list[int]] = {}
        for i in self.ordinary:
            self.by_answer.setdefault((items[i].qtype, items[i].answer), []).append(i)

    def _planted(self, qi: int, mapping: dict[str, str]) -> _Prompt:
        rng, color = self.rng, self.items[qi].color
        match = [j for j in self.by_color[color] if j != qi]
        icds = rng.sample(match, min(len(match), rng.randint(1, 4)))
        others = [j for j in self.planted if self.items[j].color != color]
        for _ in range(rng.randint(0, 2)):
            icds.append(rng.choice(others) if rng.random() < 0.75 else rng.choice(self.ordinary))
        rng.shuffle(icds)
        icds = list(dict.fromkeys(icds))
        words = list(mapping.values())
        shown = []
        for j in icds:
            it = self.items[j]
            if it.qtype != PLANTED_TYPE:
                shown.append(it.answer)
                continue
            word = mapping[it.color]
            shown.append(rng.choice([w for w in words if w != word]) if rng.random() < DEMO_NOISE else word)
        return _Prompt(icds, qi, shown, mapping[color])

    def _ordinary(self, qi: int, mapping: dict[str, str]) -> _Prompt:
        rng, it = self.rng, self.items[qi]
        icds = rng.sample([j for j in range(len(self.items)) if j != qi], rng.choice((0, 1, 2)))
        if rng.random() < 0.5:
            match = [j for j in self.by_answer[(it.qtype, it.answer)] if j != qi]
            icds += rng.sample(match, min(len(match), rng.randint(1, 3)))
        rng.shuffle(icds)
        icds = list(dict.fromkeys(icds))
        shown = [mapping[self.items[j].color] if self.items[j].qtype == PLANTED_TYPE else self.items[j].answer
                 for j in icds]
        return _Prompt(icds, qi, shown, it.answer)

    def draw(self) -> _Prompt:
        from lever.data.synthetic import CODE_WORDS, COLORS

        rng = self.rng
        mapping = dict(zip(COLORS, rng.sample(CODE_WORDS, len(COLORS))))
        if rng.random() < PLANTED_PROMPTS:
            return self._planted(rng.choice(self.planted), mapping)
        return self._ordinary(rng.choice(self.ordinary), mapping)


def _targets(ids: list[int], answer_start: int, prompt: _Prompt, items: list[_Item], code_ids: set[int]) -> list[int]:
    """Next-token targets (-100 = not trained) of one prompt: the query's answer and end token,
    and every demonstration's code word that an earlier demonstration of the same colour makes
    predictable.  The dense positions multiply the copying signal per prompt; without them the
    copy behaviour took several times more steps to appear."""
    tgt = [-100] * len(ids)
    for k in range(answer_start, len(ids)):
        tgt[k] = ids[k]
    colors = iter(items[j].color for j in prompt.icds if items[j].qtype == PLANTED_TYPE)
    seen: set[str] = set()
    for k in range(answer_start):
        if ids[k] in code_ids:
            color = next(colors, None)
            if color in seen:
                tgt[k] = ids[k]
            seen.add(color)
    return tgt


def _train(model: Any, processor: Any, cfg: LVLMConfig) -> None:
    from lever.data.synthetic import CODE_WORDS
    from lever.models.lvlm import Encoded, QwenVLM
    from lever.models.prompting import Example

    vlm = QwenVLM(model, processor, cfg, torch.device("cpu"), torch.float32)
    items = _training_items(cfg.seed + 7919)
    maker = _PromptMaker(items, random.Random(cfg.seed))
    tok = processor.tokenizer
    eos = tok.eos_token_id
    code_ids = {i for w in CODE_WORDS for i in tok(w, add_special_tokens=False)["input_ids"]}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / cfg.warmup_steps))
    model.train()
    t0 = time.time()
    for step in range(cfg.warmup_steps):
        batch: list[Encoded] = []
        targets: list[list[int]] = []
        for _ in range(BATCH):
            pr = maker.draw()
            prompt = [Example(items[j].image, items[j].question, a) for j, a in zip(pr.icds, pr.shown)]
            prompt.append(Example(items[pr.query].image, items[pr.query].question))
            enc = vlm.encode(prompt, pr.target)
            ids = enc.ids + [eos]
            batch.append(Encoded(ids, enc.answer_start, enc.images))
            targets.append(_targets(ids, enc.answer_start, pr, items, code_ids))
        inputs = vlm.collate(batch)
        length = inputs["input_ids"].shape[1]
        tgt = torch.full((BATCH, length), -100, dtype=torch.long)
        for row, t in enumerate(targets):  # left padding, as collate
            tgt[row, length - len(t):] = torch.tensor(t)
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            position_ids=vlm.position_ids(inputs), pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"), use_cache=False,
        ).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.warmup_steps - 1:
            log.info("tiny-qwen warm-up step %d/%d loss %.3f (%.0fs)", step + 1, cfg.warmup_steps, loss.item(), time.time() - t0)
    model.eval()


def apply_warmup(model: Any, processor: Any, cfg: LVLMConfig) -> None:
    """Load the cached warm-up weights for these settings, or train them (seeded) and cache them."""
    path = cache_dir() / f"warmup-{warmup_key(cfg, model.config.text_config.vocab_size)}.safetensors"
    if _load_cached(model, path):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # parallel shard processes of one run all ask for the same warm-up: one trains, the others
    # wait on the lock and then load what it wrote (an OS lock: released if the trainer dies)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _load_cached(model, path):
                return
            _train_and_save(model, processor, cfg, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _load_cached(model: Any, path: Path) -> bool:
    from safetensors.torch import load_model

    if not path.exists():
        return False
    try:
        load_model(model, str(path))
    except Exception as e:  # noqa: BLE001 - a corrupt cache entry is rebuilt, not fatal
        log.warning("ignoring unreadable warm-up cache %s (%s)", path, e)
        return False
    model.eval()
    return True


def _train_and_save(model: Any, processor: Any, cfg: LVLMConfig, path: Path) -> None:
    from safetensors.torch import load_model, save_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        _train(model, processor, cfg)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_model(model, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # reload what was written, so a fresh build and a cached build are bit-identical
    load_model(model, str(path))
    model.eval()
