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

Run ``python -m lever.bench.cost_model`` for the table of docs/performance.md.
"""

from __future__ import annotations

import math
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


# ----------------------------------------------------------------------------- pods


#: Part lengths used for the cluster fan-out: the tiny-tokenizer measurement docs/performance.md
#: reports, frozen so that the chosen defaults do not move when the tiny vocabulary does.
REFERENCE_LENGTHS = Lengths(header=14, icd=13.8, query=12.8, tail=5, answer=1.0, distinct_answers=2.1)
#: OK-VQA's split sizes (questions): every train question is a beam / RL-data query by default.
OKVQA_TRAIN, OKVQA_VAL = 9009, 5046


@dataclass(frozen=True)
class PodAssumptions:
    """What a GPU pod pays before its first query, and the fan-out rule.

    ``start_s``: container start with the image already on the node, Python + torch + transformers
    imports, CUDA context.  ``read_gb_s``: reading the model snapshot from the model volume.
    ``image_pull_s``: pulling the ~8 GB CUDA image, paid by the first pod on each node only (shown
    apart, not in the share).  ``target_share``: the most of a pod's time loading may take.
    ``max_pods``: GPUs a plan can use at once (parallelism beyond it only queues pods)."""

    tflops: float = H100_TFLOPS
    lvlm_gb: float = 7.5
    read_gb_s: float = 0.5
    start_s: float = 20.0
    image_pull_s: float = 45.0
    target_share: float = 0.10
    max_pods: int = 16

    def load_s(self, gb: float) -> float:
        return self.start_s + gb / self.read_gb_s

    def min_compute_s(self, gb: float) -> float:
        """Compute a pod needs so that loading is at most ``target_share`` of its time."""
        return self.load_s(gb) * (1 - self.target_share) / self.target_share


@dataclass(frozen=True)
class PodRow:
    stage: str
    pods: int
    units_per_pod: int
    queries_per_pod: float
    compute_s: float  # per pod
    load_s: float  # per pod

    @property
    def share(self) -> float:
        return self.load_s / (self.load_s + self.compute_s) if self.compute_s + self.load_s else 0.0


def _query_seconds(L: Lengths, plan: Any, A: PodAssumptions, img: int = 256, patches: int = 1024) -> dict[str, Any]:
    """Fast-path GPU seconds per query of the LVLM stages under ``plan``'s settings."""
    rl = plan.rl_data
    cands = rl.sources.infoscore_beam.count * rl.sources.infoscore_beam.enabled
    cands += rl.sources.v2_beam.count * rl.sources.v2_beam.enabled
    cands += len(rl.sources.v2_sample.temperatures) * rl.sources.v2_sample.per_temperature * rl.sources.v2_sample.enabled
    cands += rl.sources.retrieval.count * rl.sources.retrieval.enabled + rl.sources.random.count * rl.sources.random.enabled
    beam = beam_costs(L, img, plan.sampler.pool_size, plan.beam.beam_size, plan.beam.shots)
    rlc = rl_costs(L, img, plan.sampler.pool_size, max(1, cands), rl.shots, plan.lvlm.max_new_tokens)
    sec = lambda r: flops(r.fast_tokens, r.fast_images, patches) / A.tflops  # noqa: E731
    return {"generate-beams": sec(beam), "generate-rl-data": sec(rlc),
            "infer": {s: sec(infer_costs(L, img, s, plan.lvlm.max_new_tokens)) for s in plan.infer.shots}}


def suggest_fanout(plan: Any, L: Lengths = REFERENCE_LENGTHS, A: PodAssumptions = PodAssumptions(),
                   n_train: int = OKVQA_TRAIN) -> dict[str, int]:
    """Shards per LVLM stage and inference units per pod such that each pod computes at least
    ``A.min_compute_s`` (loading <= ``target_share``), with as many pods as that allows, up to
    ``max_pods``.  Inference units are small (one variant x shot x shard); they are grouped per
    pod rather than split further."""
    q = _query_seconds(L, plan, A)
    need = A.min_compute_s(A.lvlm_gb)
    out = {}
    for stage, key, n in (("generate-beams", "beam.shards", plan.beam.num_queries or n_train),
                          ("generate-rl-data", "rl_data.shards", plan.rl_data.num_queries or n_train)):
        total = n * q[stage]
        out[key] = int(max(1, min(A.max_pods, total // need)))
    from lever.inference.variants import infer_variants

    per_unit = [min(plan.infer.num_samples, OKVQA_VAL) * q["infer"][s] for s in plan.infer.shots]
    unit_s = sum(per_unit) / len(per_unit)
    out["infer.shards"] = 1
    n_units = len(infer_variants(plan)) * len(plan.infer.shots)
    out["infer.units_per_pod"] = int(min(n_units, max(1, math.ceil(need / unit_s))))
    return out


def pod_table(plan: Any, L: Lengths = REFERENCE_LENGTHS, A: PodAssumptions = PodAssumptions(),
              n_train: int = OKVQA_TRAIN) -> list[PodRow]:
    """Load vs compute per GPU pod of the LVLM stages of ``plan`` as configured (shards, units per
    pod).  export-embeddings (one pod, CLIP) and the training stages (one pod each, no LVLM) are
    single pods whatever the settings."""
    from lever.inference.variants import infer_variants

    q = _query_seconds(L, plan, A)
    rows = []
    for stage, shards, n in (("generate-beams", plan.beam.shards, plan.beam.num_queries or n_train),
                             ("generate-rl-data", plan.rl_data.shards, plan.rl_data.num_queries or n_train)):
        per = n / shards
        rows.append(PodRow(stage, shards, 1, per, per * q[stage], A.load_s(A.lvlm_gb)))
    n_q = min(plan.infer.num_samples, OKVQA_VAL) / plan.infer.shards
    unit_s = sum(n_q * q["infer"][s] for s in plan.infer.shots) / len(plan.infer.shots)
    n_units = len(infer_variants(plan)) * len(plan.infer.shots) * plan.infer.shards
    per_pod = min(plan.infer.units_per_pod, n_units)
    rows.append(PodRow("infer", math.ceil(n_units / per_pod), per_pod, n_q * per_pod, unit_s * per_pod,
                       A.load_s(A.lvlm_gb)))
    return rows


def pod_markdown(rows: list[PodRow], A: PodAssumptions = PodAssumptions()) -> str:
    out = ["| stage | pods | units/pod | query evaluations/pod | compute s/pod | load s/pod | load share |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.stage} | {r.pods} | {r.units_per_pod} | {r.queries_per_pod:,.0f} | {r.compute_s:,.0f} | "
                   f"{r.load_s:,.0f} | {100 * r.share:.0f}% |")
    out.append(f"\n(load = {A.start_s:.0f} s start + model / {A.read_gb_s} GB/s; the first pod on a node also "
               f"pulls the image, ~{A.image_pull_s:.0f} s; compute at {A.tflops:.0f} TFLOP/s)")
    return "\n".join(out)


def online_epoch_cost(plan: Any, L: Lengths = REFERENCE_LENGTHS, A: PodAssumptions = PodAssumptions(),
                      img: int = 256, patches: int = 1024, n_val: Optional[int] = None) -> dict[str, float]:
    """One epoch of online GRPO (``grpo.rollout: online``) without cache hits, the upper bound:
    ``queries_per_epoch x group_size`` rollout verdicts and ``eval_queries x (eval_samples + 1)``
    held-out verdicts, each a generate-rl-data candidate on the fast path (one zero-shot scoring
    per query included).  Seconds at ``A.tflops`` on one GPU; selector updates are negligible."""
    o = plan.grpo.online
    n_rl = plan.rl_data.num_queries or OKVQA_TRAIN
    n_val = n_val if n_val is not None else max(1, round(n_rl * plan.validation.val_fraction))
    train_q = min(o.queries_per_epoch or n_rl - n_val, n_rl - n_val)
    eval_q = min(o.eval_queries or n_val, n_val)
    rollout = rl_costs(L, img, plan.sampler.pool_size, o.group_size, plan.rl_data.shots, plan.lvlm.max_new_tokens)
    held = rl_costs(L, img, plan.sampler.pool_size, o.eval_samples + 1, plan.rl_data.shots, plan.lvlm.max_new_tokens)
    tflop = train_q * flops(rollout.fast_tokens, rollout.fast_images, patches) + eval_q * flops(
        held.fast_tokens, held.fast_images, patches)
    return {"rollout_verdicts": train_q * o.group_size, "heldout_verdicts": eval_q * (o.eval_samples + 1),
            "tflop": tflop, "seconds": tflop / A.tflops, "train_queries": train_q, "eval_queries": eval_q}


def main(n_records: int = 96, seed: int = 0, lvlm_cfg: Optional[Any] = None) -> str:
    from lever.config import load_plan
    from lever.models.factory import build_lvlm
    from lever.bench.scoring import _synthetic_records

    lvlm = build_lvlm(lvlm_cfg or load_plan("baseline", profile="tiny").lvlm)
    with tempfile.TemporaryDirectory(prefix="lever-cost-") as tmp:
        L = measure_lengths(lvlm, _synthetic_records(n_records, 56, seed, Path(tmp)))
    text = (f"measured lengths (tiny tokenizer, synthetic data): header {L.header:.0f}, ICD text {L.icd:.1f}, "
            f"query text {L.query:.1f}, tail {L.tail:.0f}, answer {L.answer:.2f}, "
            f"distinct gt answers {L.distinct_answers:.2f}\n\n" + markdown(cost_table(L)))
    cluster = load_plan("plan5", profile="cluster")
    before = cluster.model_copy(deep=True)
    for key, value in {"beam.shards": 8, "rl_data.shards": 8, "infer.shards": 4, "infer.units_per_pod": 1}.items():
        section, field = key.split(".")
        setattr(getattr(before, section), field, value)
    text += ("\n\nGPU pods of plan5 on the cluster profile, load vs compute (OK-VQA: "
             f"{OKVQA_TRAIN:,} train queries, {cluster.infer.num_samples} eval samples):\n\n"
             "before (8 / 8 / 4 shards, one inference unit per pod):\n\n" + pod_markdown(pod_table(before))
             + "\n\nthe cluster profile's fan-out:\n\n" + pod_markdown(pod_table(cluster))
             + f"\n\nsuggested: {suggest_fanout(cluster)}")
    on = online_epoch_cost(load_plan("plan5_online", profile="cluster"))
    text += (f"\n\nonline GRPO (plan5_online, cluster profile), one epoch without cache hits: "
             f"{on['rollout_verdicts']:,} rollout + {on['heldout_verdicts']:,} held-out verdicts, "
             f"{on['tflop']:,.0f} TFLOP, {on['seconds']:,.0f} s of LVLM at {H100_TFLOPS:.0f} TFLOP/s")
    print(text)
    return text


if __name__ == "__main__":  # pragma: no cover
    main()
