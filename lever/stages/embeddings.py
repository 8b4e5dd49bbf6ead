"""``export-embeddings`` stage: CLIP-style image, text and query embeddings for both splits.

Query embedding = normalized mean of the normalized image and question embeddings (SPEC); the
candidate embedding of a train item is the same row. Rows follow the dataset's recorded order,
and that order is written beside the tensors so readers can verify the pairing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from tqdm import tqdm

from lever.data.dataset import VQARecord, load_stage_index
from lever.models.embeddings import Embeddings, query_embedding, save_embeddings
from lever.models.encoder import Encoder, build_encoder
from lever.errors import StageError
from lever.context import StageContext


def _open_image(rec: VQARecord) -> Image.Image:
    try:
        with Image.open(rec.image_path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise StageError(f"image of question_id {rec.question_id}: cannot read {rec.image_path}: {e}") from None


def embed_records(encoder: Encoder, records: Sequence[VQARecord], batch_size: int, desc: str = "embed",
                  on_batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) embeddings of ``records`` in order, computed in batches under no_grad."""
    images, texts = [], []
    with torch.no_grad():
        for start in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch", leave=False):
            batch = records[start:start + batch_size]
            images.append(encoder.encode_images([_open_image(r) for r in batch]))
            texts.append(encoder.encode_texts([r.question for r in batch]))
            if on_batch is not None:
                on_batch(len(batch))
    dim = encoder.dim
    img = torch.cat(images) if images else torch.zeros(0, dim)
    txt = torch.cat(texts) if texts else torch.zeros(0, dim)
    return img.float(), txt.float()


def export_embeddings(ctx: StageContext) -> None:
    """Embed every train and val item of the prepare-data artifact into ``ctx.out``."""
    index = load_stage_index(ctx)
    encoder = build_encoder(ctx.plan.encoder, models_root=ctx.plan.models.root)
    total = len(index.train) + len(index.val)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        ctx.telemetry.progress(done, total)

    tensors: dict[str, torch.Tensor] = {}
    for split in ("train", "val"):
        img, txt = embed_records(encoder, index.split(split), ctx.plan.encoder.batch_size, f"embed {split}", tick)
        tensors[f"{split}_image"] = torch.nn.functional.normalize(img, dim=-1)
        tensors[f"{split}_text"] = torch.nn.functional.normalize(txt, dim=-1)
        tensors[f"{split}_query"] = query_embedding(img, txt)
    order = {s: [r.question_id for r in index.split(s)] for s in ("train", "val")}
    out = Path(ctx.out)
    out.mkdir(parents=True, exist_ok=True)
    save_embeddings(out, Embeddings(**tensors, order=order))
    ctx.log.info("export-embeddings: train=%d val=%d dim=%d", len(index.train), len(index.val), encoder.dim)
