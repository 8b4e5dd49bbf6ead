"""The ``cluster`` code path on CPU: models in the exact hub file layout, data in the real OK-VQA
layout, provisioned the way the cluster provisions them, loaded offline.

This is the new user's trial as a test: the tiny Qwen2.5-VL and tiny CLIP exported like
Qwen/Qwen2.5-VL-3B-Instruct and openai/clip-vit-base-patch32 (flat legacy config.json, a
Qwen2Tokenizer, the published chat template in chat_template.json, the hub's sampling
generation_config.json, two weight shards with legacy key names), an OK-VQA folder with COCO file
names, grayscale and CMYK JPEGs and unreferenced images, and ``lever run plan5 --profile cluster``
run to a report.  Each other test pins one thing the trial broke.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from okvqa_layout import write_okvqa

ROOT = Path(__file__).resolve().parents[1]
QWEN = "Qwen/Qwen2.5-VL-3B-Instruct"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Hub-layout exports (the tiny profile's warmed-up Qwen, so some answers copy an ICD's) and
    an OK-VQA-layout folder."""
    from lever.config import load_plan
    from lever.models.hub_layout import export_tiny_clip, export_tiny_qwen

    root = tmp_path_factory.mktemp("hub")
    tiny = load_plan("baseline", "tiny").lvlm
    export_tiny_qwen(root / "qwen", seed=tiny.seed, warmup_steps=tiny.warmup_steps)
    export_tiny_qwen(root / "qwen-neutral", seed=tiny.seed, warmup_steps=tiny.warmup_steps, sampling={})
    export_tiny_clip(root / "clip")
    summary = write_okvqa(root / "okvqa")
    return root, summary


def _lever(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "lever", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def _lvlm(directory: Path, dtype: str = "float32"):
    from lever.config.schema import LVLMConfig
    from lever.models.factory import build_lvlm

    cfg = LVLMConfig(kind="qwen2_5_vl", name=str(directory), revision=None, dtype=dtype, device="cpu",
                     min_pixels=3136, max_pixels=12544, max_new_tokens=5)
    return build_lvlm(cfg, cache=False)


def _records(root: Path):
    from lever.data.dataset import load_split

    d = root / "okvqa"
    return load_split(d / "OpenEnded_mscoco_train2014_questions.json", d / "mscoco_train2014_annotations.json",
                      d / "train2014")


def _prompts(recs, n: int, max_icds: int = 3, seed: int = 0):
    from lever.models.prompting import icd_example, query_example

    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = i % (max_icds + 1)
        others = [j for j in range(len(recs)) if j != i]
        out.append([icd_example(recs[j]) for j in rng.sample(others, k)] + [query_example(recs[i])])
    return out


# ------------------------------------------------------------------ the files and the processor


def test_export_has_the_hub_layout(hub):
    root, summary = hub
    q = root / "qwen"
    cfg = json.loads((q / "config.json").read_text())
    assert "text_config" not in cfg and cfg["model_type"] == "qwen2_5_vl" and cfg["hidden_size"] == 64
    assert cfg["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert json.loads((q / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"
    assert "Picture {{ image_count.value }}" in json.loads((q / "chat_template.json").read_text())["chat_template"]
    gen = json.loads((q / "generation_config.json").read_text())
    assert gen["repetition_penalty"] == 1.05 and gen["do_sample"] is True
    index = json.loads((q / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert any(k.startswith("visual.blocks.") for k in index["weight_map"])  # legacy key names
    assert summary["train"]["modes"]["L"] >= 1 and summary["train"]["modes"]["CMYK"] >= 1
    assert summary["train"]["images"] > len({i for i in range(summary["train"]["questions"] // 2)})


def test_processor_is_the_real_class_and_agrees_with_lever_encoding(hub):
    """The processor is transformers' Qwen2_5_VLProcessor (no video processor: that one needs
    torchvision), with the hub's tokenizer class and template; its own __call__ expands images to
    the same token ids Lever's encoder builds."""
    from transformers import Qwen2_5_VLProcessor

    from lever.models.pretrained import load_qwen_processor

    root, _ = hub
    proc = load_qwen_processor(root / "qwen", 3136, 12544)
    assert isinstance(proc, Qwen2_5_VLProcessor) and type(proc.tokenizer).__name__ == "Qwen2Tokenizer"
    lvlm = _lvlm(root / "qwen")
    from lever.models.prompting import load_image

    for prompt in _prompts(_records(root), 5):
        enc = lvlm.encode(prompt)
        images = [load_image(ex.image) for ex in prompt]
        text = proc.apply_chat_template(
            [{"role": "user", "content": [c for ex in prompt for c in
                                          ({"type": "image"}, {"type": "text", "text": f"Question:{ex.question} Short answer:"
                                                                + (ex.answer or "")})]}],
            tokenize=False, add_generation_prompt=True)
        ref = proc(text=[text], images=images, return_tensors="pt")
        assert ref["input_ids"][0].tolist() == enc.ids


def test_autoprocessor_needs_torchvision_which_the_route_avoids(hub):
    """Why the route exists: AutoProcessor builds Qwen's video processor, which needs torchvision
    (absent beside the CPU torch build); failing that way on the cluster was exit 1, retried."""
    pytest.importorskip("transformers")
    try:
        import torchvision  # noqa: F401
    except Exception:
        from transformers import AutoProcessor

        with pytest.raises(ImportError, match="[Tt]orchvision"):
            AutoProcessor.from_pretrained(str(hub[0] / "qwen"))
    else:  # pragma: no cover - an image with torchvision: the route must still work
        pytest.skip("torchvision importable here")


# ------------------------------------------------------------------ greedy decoding


def test_greedy_answers_do_not_depend_on_the_checkpoint_generation_config(hub):
    """The same weights with the hub's generation_config.json (sampling, temperature 1e-6,
    repetition penalty 1.05) and with a neutral one give identical answers.  The old call
    (do_sample=False, everything else inherited) does not: the penalty flips answers, and only
    where the answer was an ICD's answer -- the bias against copying."""
    root, _ = hub
    prompts = _prompts(_records(root), 36)
    hub_lvlm, neutral = _lvlm(root / "qwen"), _lvlm(root / "qwen-neutral")
    ours = hub_lvlm.generate(prompts, 5)
    assert ours == neutral.generate(prompts, 5)
    from transformers import GenerationConfig

    hub_lvlm.model.generation_config = GenerationConfig.from_pretrained(str(root / "qwen"))
    old = []
    for p in prompts:
        inputs = hub_lvlm.collate([hub_lvlm.encode(p)])
        out = hub_lvlm.model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=hub_lvlm.pad_id,
                                      eos_token_id=hub_lvlm.tokenizer.eos_token_id)
        old.append(hub_lvlm.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    changed = [i for i, (a, b) in enumerate(zip(ours, old)) if a != b]
    assert changed, "the hub's repetition penalty changed no answer: this test would prove nothing"
    for i in changed:
        assert ours[i].strip() in {ex.answer for ex in prompts[i][:-1]}, (ours[i], old[i])


# ------------------------------------------------------------------ bf16


def test_bf16_fast_and_plain_scoring_agree_within_the_stated_tolerance(hub):
    """The GPU dtype through the cluster route (bf16 weights from the hub layout): the fast path
    stays within ``LOGPROB_TOLERANCE['bfloat16']`` of the plain path for prompts with 0-3 ICDs;
    fp32 within its own, far tighter, bound."""
    from lever.models.fast_scoring import LOGPROB_TOLERANCE, FastScorer
    from lever.models.prompting import most_common_answer

    root, _ = hub
    recs = _records(root)
    prompts = _prompts(recs, 16)
    answers = [most_common_answer(recs[i].answers) for i in range(16)]
    gaps = {}
    for dtype in ("bfloat16", "float32"):
        lvlm = _lvlm(root / "qwen", dtype)
        assert next(lvlm.model.parameters()).dtype == getattr(torch, dtype)
        fast = FastScorer(lvlm).answer_logprob(prompts, answers)
        plain = lvlm.answer_logprob(prompts, answers)
        gaps[dtype] = max(abs(a - b) for a, b in zip(fast, plain))
        assert gaps[dtype] < LOGPROB_TOLERANCE[dtype], (dtype, gaps[dtype])
    assert gaps["float32"] < gaps["bfloat16"]  # the bf16 bound is about bf16, not a slack fp32 path


# ------------------------------------------------------------------ provisioning


def test_model_sources_resolve_offline(hub, tmp_path, monkeypatch):
    """Hub id at a pinned revision: under models.root, else the Hugging Face cache; a local
    directory as is; every miss is a StageError naming where it looked."""
    from lever.models.provision import ModelRef, pull, resolve
    from lever.errors import StageError

    root, _ = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rev = "66285546d2b821cf421d4f5eb2576359d3770cd3"
    ref = ModelRef("lvlm", QWEN, rev)
    with pytest.raises(StageError, match=r"not provisioned .*models-root.*Hugging Face cache.*lever models pull"):
        resolve(ref, str(tmp_path / "models-root"))
    with pytest.raises(StageError, match="lvlm.revision: .* pin a commit"):
        resolve(ModelRef("lvlm", QWEN, None), None)
    # the Hugging Face cache layout, as `huggingface-cli download` leaves it
    snap = tmp_path / "hf" / "hub" / "models--Qwen--Qwen2.5-VL-3B-Instruct" / "snapshots" / rev
    shutil.copytree(root / "qwen", snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(rev)
    assert resolve(ref, None) == snap
    # a snapshot under models.root wins; an incomplete one is an error, not a fallback
    where = Path(pull(ref, str(tmp_path / "models-root"), source=str(root / "qwen"), echo=lambda m: None))
    assert resolve(ref, str(tmp_path / "models-root")) == where
    assert json.loads((where / "lever-model.json").read_text())["revision"] == rev
    with pytest.raises(StageError, match=f"holds revision {rev}, the plan pins 0000"):
        resolve(ModelRef("lvlm", str(where), "0" * 40), None)
    (where / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(StageError, match="incomplete: model-00002-of-00002.safetensors: missing"):
        resolve(ref, str(tmp_path / "models-root"))
    with pytest.raises(StageError, match="model directory not found"):
        resolve(ModelRef("lvlm", str(tmp_path / "nope"), None), None)


@pytest.mark.integration
def test_snapshots_in_s3_are_pulled_verified_and_loaded(hub, tmp_path, monkeypatch):
    """models.root on S3 (a real HTTP S3 server): pull writes a committed snapshot; a stage loads
    it by hub id under the root or by its s3:// URL, sha256-checked on download."""
    from s3_server import moto_s3

    from lever.models.provision import ModelRef, pull, resolve
    from lever.errors import StageError

    root, _ = hub
    monkeypatch.setenv("LEVER_CACHE_DIR", str(tmp_path / "cache"))
    with moto_s3(monkeypatch) as (endpoint, bucket):
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        models = f"s3://{bucket}/lever-models"
        rev = "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268"
        ref = ModelRef("encoder", "openai/clip-vit-base-patch32", rev)
        url = pull(ref, models, source=str(root / "clip"), echo=lambda m: None)
        assert url == f"{models}/openai--clip-vit-base-patch32/{rev}"
        local = resolve(ref, models)
        assert (local / "config.json").read_bytes() == (root / "clip" / "config.json").read_bytes()
        assert resolve(ModelRef("encoder", url, None), None) == local
        from lever.config.schema import EncoderConfig
        from lever.models.encoder import build_encoder

        enc = build_encoder(EncoderConfig(kind="clip", name=url), models_root=None)
        assert enc.encode_texts(["what color is the shape?"]).shape == (1, 32)
        with pytest.raises(StageError, match="not provisioned"):
            resolve(ModelRef("lvlm", QWEN, "0" * 40), models)
        # a damaged object is caught by its sha256 on download, never loaded
        from s3_server import client

        key = f"lever-models/openai--clip-vit-base-patch32/{rev}/config.json"
        body = client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
        client(endpoint).put_object(Bucket=bucket, Key=key, Body=body.replace(b'"', b"'", 1))
        shutil.rmtree(tmp_path / "cache" / "s3")
        with pytest.raises(StageError, match="damaged"):
            resolve(ref, models)


# ------------------------------------------------------------------ the trial, end to end


CLUSTER_ON_CPU = [
    "lvlm.device=cpu", "lvlm.dtype=float32", "lvlm.min_pixels=3136", "lvlm.max_pixels=3136", "lvlm.max_new_tokens=3",
    "encoder.batch_size=32", "sampler.pool_size=8", "beam.num_queries=8", "beam.beam_size=2", "beam.shards=2",
    "rl_data.num_queries=8", "rl_data.shards=1", "selector.hidden=32", "v2.epochs=2", "rce.epochs=2",
    "grpo.epochs=2", "infer.num_samples=8", "infer.shards=1", "report.bootstrap_samples=200",
]


@pytest.mark.slow
def test_cluster_profile_runs_end_to_end_from_hub_layouts(hub, tmp_path):
    """`lever models pull` from the hub-layout directories, then `lever run plan5 --profile
    cluster` with only sizes and the CPU overridden: the real routes (qwen2_5_vl and clip by hub
    id at their pinned revisions under models.root, the okvqa loader, images relative to
    data.root) run offline to a report."""
    root, _ = hub
    models = tmp_path / "models"
    res = _lever("models", "pull", "--plan", "plan5", "--profile", "cluster", "--to", str(models),
                 "--lvlm-from", str(root / "qwen"), "--encoder-from", str(root / "clip"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    sets = [f"data.root={root / 'okvqa'}", f"models.root={models}", *CLUSTER_ON_CPU]
    args = [a for s in sets for a in ("--set", s)]
    res = _lever("run", "plan5", "--profile", "cluster", "--store", str(tmp_path / "store"), *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = Path(res.stdout.strip().splitlines()[-1])
    data = json.loads((report.parent / "report.json").read_text())
    assert report.is_file() and "plan5 vs baseline" in report.read_text() and data["partial"] is False
    for row in ("plan", "baseline", "random", "retrieval"):  # every row evaluated at every shot on 8 queries
        assert set(data["n"][row]) == {"1", "2", "3", "4"} and set(data["n"][row].values()) == {8}, row
    assert "lvlm: loading Qwen/Qwen2.5-VL-3B-Instruct from " + str(models) in res.stderr
    (ds,) = (tmp_path / "store" / "prepare-data").glob("*/dataset.json")
    doc = json.loads(ds.read_text())
    assert doc["image_base"] == "data.root" and all(not Path(r["image"]).is_absolute() for r in doc["splits"]["train"])
    rl = sorted((tmp_path / "store" / "generate-rl-data").glob("*/rl_data.jsonl"))  # plan5's and the baseline's
    cands = [c for f in rl for line in f.read_text().splitlines() for c in json.loads(line)["candidates"]]
    assert cands and not any(c["eval_failed"] for c in cands)
    assert any(c["correct"] for c in cands)  # the warmed tiny model gets some right through Qwen's tokenizer


def test_a_model_that_is_not_provisioned_exits_2_naming_it(hub, tmp_path):
    root, _ = hub
    sets = [f"data.root={root / 'okvqa'}", f"models.root={tmp_path / 'empty'}", *CLUSTER_ON_CPU]
    args = [a for s in sets for a in ("--set", s)]
    store = str(tmp_path / "store")
    assert _lever("stage", "prepare-data", "--plan", "plan5", "--profile", "cluster", "--store", store, *args,
                  cwd=tmp_path).returncode == 0
    res = _lever("stage", "export-embeddings", "--plan", "plan5", "--profile", "cluster", "--store", store, *args,
                 cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "openai/clip-vit-base-patch32@3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268 is not provisioned" in res.stderr
    assert "lever models pull" in res.stderr and "Traceback" not in res.stderr


def test_missing_image_files_are_named(hub, tmp_path):
    root, _ = hub
    data = tmp_path / "okvqa"
    shutil.copytree(root / "okvqa", data)
    sets = [f"data.root={data}", *CLUSTER_ON_CPU]
    args = [a for s in sets for a in ("--set", s)]
    store = str(tmp_path / "store")
    assert _lever("stage", "prepare-data", "--plan", "plan5", "--profile", "cluster", "--store", store, *args,
                  cwd=tmp_path).returncode == 0
    victim = sorted((data / "val2014").glob("*.jpg"))[0]
    victim.unlink()
    res = _lever("stage", "export-embeddings", "--plan", "plan5", "--profile", "cluster", "--store", store, *args,
                 cwd=tmp_path)
    assert res.returncode == 2 and victim.name in res.stderr and "question_id" in res.stderr, res.stderr
    res = _lever("stage", "prepare-data", "--plan", "plan5", "--profile", "cluster", "--store", store, *args,
                 "--force", cwd=tmp_path)
    assert res.returncode == 2 and victim.name in res.stderr, res.stderr


def test_model_revisions_are_in_the_keys_and_the_models_root_is_not():
    """A different pinned revision is a different model: every unit that used it is rebuilt;
    where the snapshot is read from (models.root) or how much image cache a process keeps is not
    content, so those leave every key alone."""
    from lever.config import load_plan
    from lever.pipeline.hashing import plan_keys

    base = plan_keys(load_plan("plan5", "cluster"))
    lvlm_rev = plan_keys(load_plan("plan5", "cluster", ["lvlm.revision=" + "a" * 40]))
    enc_rev = plan_keys(load_plan("plan5", "cluster", ["encoder.revision=" + "b" * 40]))
    moved = plan_keys(load_plan("plan5", "cluster", ["models.root=s3://elsewhere/models", "lvlm.image_cache_mb=64"]))
    assert moved.units == base.units
    for stage in ("generate-beams", "generate-rl-data", "infer"):
        assert lvlm_rev.stage_hash[stage] != base.stage_hash[stage], stage
    assert lvlm_rev.stage_hash["export-embeddings"] == base.stage_hash["export-embeddings"]
    assert enc_rev.stage_hash["export-embeddings"] != base.stage_hash["export-embeddings"]
    assert enc_rev.stage_hash["prepare-data"] == base.stage_hash["prepare-data"]
