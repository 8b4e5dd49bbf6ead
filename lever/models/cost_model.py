"""LVLM cost model: forward tokens per query per stage, plain vs fast path.

Why a model and not only a benchmark: the cluster runs Qwen2.5-VL-3B on a GPU, which this
project cannot measure offline; what we *can* count exactly is how many tokens each path pushes
through the language model and how many image patches through the vision tower, per query of
each stage, from the prompt layout and the stage settings.  Text lengths are measured with the
tiny profile's tokenizer and templates on the synthetic dataset (an estimate: Qwen's tokenizer and
OKVQA's questions differ a little); image tokens are an argument (256 per 448x448 image for
Qwen2.5-VL: (448/14)^2 = 1024 patches, merged 2x2).

Counting rules, per query (prompt = header, ICDs, query, tail, answer; see ``lever.models.prompting``):

* plain scoring feeds every prompt's whole sequence and encodes every image of every prompt;
* fast scoring encodes each distinct image once per query, feeds each shared prefix once (the
  header; a beam's ICDs; a whole prompt scored with several answers) and then only the suffixes,
  minus each sequence's last token (no logit is needed after it);
* generation (RL-data verdicts, infer) is the same on both paths token-wise: prefill + one token
  per decode step; batching changes throughput, not tokens (left padding is small after sorting);
* RL data on the fast path scores the gt answers on the generation's own key/value cache, so a
  candidate's prompt goes through the model once (``FastScorer.generate_and_score``).

Run ``python -m lever.models.cost_model`` for the table of docs/performance.md.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class Lengths:
    """Average token counts of the prompt parts, image tokens excluded (markers included)."""

    header: float  # system turn + user turn opener
    icd: float  # <|vision_start|><|vision_end|> + "Question:{q} Short answer:{a}"
    query: float  # <|vision_start|><|vision_end|> + "Question:{q} Short answer:"
    tail: float  # end of user turn + assistant turn opener
    answer: float  # tokens of a gt answer
    distinct_answers: float  # distinct normalized gt answers per query (gt_prob scorings)


def measure_lengths(lvlm: Any, records: list[Any]) -> Lengths:
    """Average part lengths over ``records`` with the LVLM's real tokenizer and chat template."""
    from lever.models.prompting import Example, answer_weights, icd_example, most_common_answer, query_example

    img = lvlm.image_token_id

    def text_len(ids: list[int]) -> int:
        return len(ids) - ids.count(img)

    q0 = query_example(records[0])
    base = lvlm.encode([q0]).ids
    vs = lvlm.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    header = base.index(vs)
    query_only = lvlm.encode([Example(None, q0.question)]).ids  # header + query text + tail
    tail = len(query_only) - header - len(lvlm._tokenize(f"Question:{q0.question} Short answer:"))
    queries, icds, answers, distinct = [], [], [], []
    for r in records:
        q = query_example(r)
        alone = text_len(lvlm.encode([q]).ids)
        queries.append(alone - header - tail)
        icds.append(text_len(lvlm.encode([icd_example(r), q0]).ids) - text_len(base))
        e = lvlm.encode([q], most_common_answer(r.answers))
        answers.append(e.n_answer)
        distinct.append(len(answer_weights(r.answers)))
    return Lengths(float(header), statistics.mean(icds), statistics.mean(queries), float(tail),
                   statistics.mean(answers), statistics.mean(distinct))


@dataclass(frozen=True)
class StageCost:
    stage: str
    what: str
    plain_tokens: float  # language-model tokens fed
    fast_tokens: float
    plain_images: float  # images through the vision tower
    fast_images: float

    @property
    def ratio(self) -> float:
        return self.plain_tokens / self.fast_tokens if self.fast_tokens else float("inf")


def beam_costs(L: Lengths, img: int, K: int, B: int, S: int) -> StageCost:
    """InfoScore beam search: zero-shot, then K one-ICD prompts, then B*(K-s+1) prompts per step s."""
    tail = L.query + img + L.tail + L.answer
    plain_t = plain_i = fast_t = 0.0
    for s in range(S + 1):
        n = 1 if s == 0 else K if s == 1 else B * (K - s + 1)
        plain_t += n * (L.header + s * (L.icd + img) + tail)
        plain_i += n * (s + 1)
        if s == 0:
            fast_t += L.header + tail - 1
        else:
            groups = 1 if s == 1 else B
            fast_t += groups * (L.header + (s - 1) * (L.icd + img)) + n * (L.icd + img + tail - 1)
    scorings = 1 + K + sum(B * (K - s + 1) for s in range(2, S + 1))
    return StageCost("generate-beams", f"K={K} B={B} S={S}: {scorings} scorings", plain_t, fast_t, plain_i, K + 1)


def rl_costs(L: Lengths, img: int, K: int, candidates: int, shots: int, max_new: int) -> StageCost:
    """RL data: every candidate sequence is generated (prefill + decode) and scored against each
    distinct gt answer; plus the zero-shot P(y|x)."""
    prompt = L.header + shots * (L.icd + img) + L.query + img + L.tail
    gen = candidates * (prompt + max_new)
    zero = L.header + L.query + img + L.tail + L.answer
    d = L.distinct_answers
    plain_t = gen + zero + candidates * d * (prompt + L.answer)
    # fast: the answers are scored on the generation's own cache (last prompt token + answer)
    fast_t = gen + zero - 1 + candidates * d * L.answer
    gen_images = candidates * (shots + 1)
    plain_i = gen_images + 1 + candidates * d * (shots + 1)
    fast_i = gen_images + 1
    return StageCost("generate-rl-data", f"{candidates} candidates x {shots} shots, {d:.1f} gt answers",
                     plain_t, fast_t, plain_i, fast_i)


def infer_costs(L: Lengths, img: int, shot: int, max_new: int) -> StageCost:
    t = L.header + shot * (L.icd + img) + L.query + img + L.tail + max_new
    return StageCost("infer", f"shot {shot}, {max_new} new tokens", t, t, shot + 1, shot + 1)


def cost_table(L: Lengths, img: int = 256, K: int = 64, B: int = 5, S: int = 2, rl_candidates: int = 18,
               rl_shots: int = 2, max_new: int = 5, shots: tuple[int, ...] = (1, 2, 3, 4)) -> list[StageCost]:
    rows = [beam_costs(L, img, K, B, S), rl_costs(L, img, K, rl_candidates, rl_shots, max_new)]
    rows += [infer_costs(L, img, s, max_new) for s in shots]
    return rows


#: Qwen2.5-VL-3B, dense forward FLOPs (2 x parameters touched per token):
#: language model: 36 layers x (attention 9.4M + MLP 3 x 2048 x 11008 = 67.6M) = 2.77B non-embedding
#: parameters -> 5.5 GFLOP per token (attention scores add ~0.2 GFLOP at ~800 tokens of context);
#: vision tower: 32 layers x (4 x 1280^2 + 3 x 1280 x 3420) = 0.63B -> 1.26 GFLOP per 14x14 patch.
LM_GFLOP_PER_TOKEN = 5.5
VIT_GFLOP_PER_PATCH = 1.26
#: assumed sustained bf16 throughput on one H100 (40% of the 989 TFLOP/s dense peak)
H100_TFLOPS = 400.0


def flops(tokens: float, images: float, patches_per_image: int = 1024) -> float:
    """Forward TFLOP of ``tokens`` language-model tokens and ``images`` images."""
    return (tokens * LM_GFLOP_PER_TOKEN + images * patches_per_image * VIT_GFLOP_PER_PATCH) / 1000.0


def markdown(rows: list[StageCost], patches_per_image: int = 1024) -> str:
    out = ["| stage | per query | LM tokens plain | LM tokens fast | images plain | images fast | "
           "TFLOP plain | TFLOP fast | ratio | H100 s plain | H100 s fast |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fp = flops(r.plain_tokens, r.plain_images, patches_per_image)
        ff = flops(r.fast_tokens, r.fast_images, patches_per_image)
        out.append(f"| {r.stage} | {r.what} | {r.plain_tokens:,.0f} | {r.fast_tokens:,.0f} | "
                   f"{r.plain_images:,.0f} | {r.fast_images:,.0f} | {fp:,.1f} | {ff:,.1f} | {fp / ff:.1f}x | "
                   f"{fp / H100_TFLOPS:.2f} | {ff / H100_TFLOPS:.2f} |")
    return "\n".join(out)


def main(n_records: int = 96, seed: int = 0, lvlm_cfg: Optional[Any] = None) -> str:
    from lever.config import load_plan
    from lever.models.lvlm import build_lvlm
    from lever.models.scoring_bench import _synthetic_records

    lvlm = build_lvlm(lvlm_cfg or load_plan("baseline", profile="tiny").lvlm)
    with tempfile.TemporaryDirectory(prefix="lever-cost-") as tmp:
        L = measure_lengths(lvlm, _synthetic_records(n_records, 56, seed, Path(tmp)))
    text = (f"measured lengths (tiny tokenizer, synthetic data): header {L.header:.0f}, ICD text {L.icd:.1f}, "
            f"query text {L.query:.1f}, tail {L.tail:.0f}, answer {L.answer:.2f}, "
            f"distinct gt answers {L.distinct_answers:.2f}\n\n" + markdown(cost_table(L)))
    print(text)
    return text


if __name__ == "__main__":  # pragma: no cover
    main()
