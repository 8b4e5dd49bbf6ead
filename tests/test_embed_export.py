"""export-embeddings on the tiny profile: shapes, normalization, order, query = normalized mean."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lever.config import load_plan
from lever.config.schema import EncoderConfig
from lever.data.dataset import load_index
from lever.stages.prepare_data import prepare_data
from lever.stages.embeddings import export_embeddings
from lever.models.embeddings import TENSOR_NAMES, load_embeddings, query_embedding
from lever.models.encoder import build_encoder
from lever.errors import StageError
from lever.context import StageContext, UpstreamOutput
from lever.context import Unit


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("embed")
    plan = load_plan("baseline", "tiny")
    data_dir, emb_dir = root / "data", root / "emb"
    prepare_data(StageContext(plan=plan, stage="prepare-data", unit=Unit("prepare-data"), inputs={}, out=data_dir))
    upstream = {"prepare-data": UpstreamOutput("prepare-data", [(Unit("prepare-data"), data_dir)])}
    export_embeddings(StageContext(plan=plan, stage="export-embeddings", unit=Unit("export-embeddings"),
                                   inputs=upstream, out=emb_dir))
    return data_dir, emb_dir


def test_shapes_dtype_and_order(artifacts) -> None:
    data_dir, emb_dir = artifacts
    index = load_index(data_dir)
    order = {s: [r.question_id for r in index.split(s)] for s in ("train", "val")}
    emb = load_embeddings(emb_dir, expected_order=order)
    assert emb.order == order
    assert json.loads((emb_dir / "order.json").read_text()) == order
    plan = load_plan("baseline", "tiny")
    for name, t in emb.tensors().items():
        split = name.split("_")[0]
        assert t.dtype == torch.float32
        assert t.shape == (len(order[split]), plan.encoder.projection_dim)
        assert torch.allclose(t.norm(dim=1), torch.ones(t.shape[0]), atol=1e-5)


def test_query_is_normalized_mean_of_image_and_text(artifacts) -> None:
    emb = load_embeddings(artifacts[1])
    for split in ("train", "val"):
        img, txt, q = emb.get(split, "image"), emb.get(split, "text"), emb.get(split, "query")
        expected = (img + txt) / (img + txt).norm(dim=1, keepdim=True)
        assert torch.allclose(q, expected, atol=1e-6)
        # the query is not just one of the modalities
        assert not torch.allclose(q, img, atol=1e-3) and not torch.allclose(q, txt, atol=1e-3)
    assert torch.equal(emb.candidates, emb.train_query)


def test_rows_match_records_and_are_reproducible(artifacts) -> None:
    """Row i embeds dataset record i: re-encode a few records directly and compare."""
    from PIL import Image

    data_dir, emb_dir = artifacts
    index = load_index(data_dir)
    emb = load_embeddings(emb_dir)
    enc = build_encoder(load_plan("baseline", "tiny").encoder)
    picks = [0, 7, len(index.train) - 1]
    imgs = [Image.open(index.train[i].image_path).convert("RGB") for i in picks]
    assert torch.allclose(enc.encode_images(imgs), emb.train_image[picks], atol=1e-5)
    txt = enc.encode_texts([index.train[i].question for i in picks])
    assert torch.allclose(txt, emb.train_text[picks], atol=1e-5)
    # different questions give different text embeddings (the tokenizer does not collapse them)
    first = index.train[0].question
    other = next(i for i, r in enumerate(index.train) if r.question != first)
    assert not torch.allclose(emb.train_text[0], emb.train_text[other], atol=1e-4)


def test_query_embedding_hand_worked() -> None:
    img = torch.tensor([[3.0, 0.0]])   # -> [1, 0]
    txt = torch.tensor([[0.0, -2.0]])  # -> [0, -1]
    q = query_embedding(img, txt)      # [1, -1] / sqrt(2)
    assert torch.allclose(q, torch.tensor([[1.0, -1.0]]) / 2 ** 0.5)


def test_reader_rejects_wrong_order_and_shapes(artifacts, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _, emb_dir = artifacts
    bad = tmp_path / "bad"
    shutil.copytree(emb_dir, bad)
    order = json.loads((bad / "order.json").read_text())
    swapped = dict(order, train=[order["train"][1], order["train"][0]] + order["train"][2:])
    with pytest.raises(StageError, match=r"train order differs from the dataset at position 0"):
        load_embeddings(bad, expected_order=swapped)
    # order.json lists one item fewer than the tensors hold
    (bad / "order.json").write_text(json.dumps(dict(order, val=order["val"][:-1])))
    n_val = len(order["val"])
    with pytest.raises(StageError, match=rf"val_image has {n_val} rows but order.json lists {n_val - 1}"):
        load_embeddings(bad)
    (bad / "order.json").write_text(json.dumps(order))
    tensors = load_file(str(bad / "embeddings.safetensors"))
    tensors["train_text"] = tensors["train_text"] * 2
    save_file(tensors, str(bad / "embeddings.safetensors"))
    with pytest.raises(StageError, match="train_text are not L2-normalized"):
        load_embeddings(bad)
    del tensors["val_query"]
    tensors["train_text"] = tensors["train_text"] / 2
    save_file(tensors, str(bad / "embeddings.safetensors"))
    with pytest.raises(StageError, match=r"missing tensor\(s\) \['val_query'\]"):
        load_embeddings(bad)
    assert set(TENSOR_NAMES) == {f"{s}_{k}" for s in ("train", "val") for k in ("image", "text", "query")}


def test_tiny_encoder_is_seeded() -> None:
    a = build_encoder(EncoderConfig(kind="tiny_clip", seed=1)).encode_texts(["What shape is shown?"])
    b = build_encoder(EncoderConfig(kind="tiny_clip", seed=1)).encode_texts(["What shape is shown?"])
    c = build_encoder(EncoderConfig(kind="tiny_clip", seed=2)).encode_texts(["What shape is shown?"])
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_tiny_tokenizer_maps_unknown_words_to_unk() -> None:
    enc = build_encoder(EncoderConfig(kind="tiny_clip"))
    toks = enc.tokenizer.encode("What colour is the circle?").tokens
    assert toks == ["[BOS]", "what", "[UNK]", "is", "the", "circle", "?", "[EOS]"]


def test_clip_without_weights_fails_clearly(tmp_path: Path) -> None:
    """Offline, a pretrained CLIP that is not on disk must fail with a StageError naming the field."""
    with pytest.raises(StageError, match=r"encoder.name: cannot load CLIP model .*tiny_clip"):
        build_encoder(EncoderConfig(kind="clip", name=str(tmp_path / "no-such-clip")))


def test_missing_image_names_question(artifacts, tmp_path: Path) -> None:
    data_dir, _ = artifacts
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    index = load_index(broken)
    index.train[0].image_path.unlink()
    plan = load_plan("baseline", "tiny")
    upstream = {"prepare-data": UpstreamOutput("prepare-data", [(Unit("prepare-data"), broken)])}
    ctx = StageContext(plan=plan, stage="export-embeddings", unit=Unit("export-embeddings"), inputs=upstream, out=tmp_path / "e")
    with pytest.raises(StageError, match=rf"question_id {index.train[0].question_id}"):
        export_embeddings(ctx)
