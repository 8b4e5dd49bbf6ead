"""Reader (and writer) of the ``export-embeddings`` artifact.

Downstream stages index these tensors by global id, so the reader refuses anything whose shapes,
dtype, normalization or recorded order disagree, instead of letting a stale or foreign file
silently pair embeddings with the wrong questions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lever.data.io import atomic_write_bytes, atomic_write_json
from lever.errors import StageError

EMBEDDINGS_FILE = "embeddings.safetensors"
ORDER_FILE = "order.json"
SPLITS = ("train", "val")
KINDS = ("image", "text", "query")
TENSOR_NAMES = tuple(f"{s}_{k}" for s in SPLITS for k in KINDS)
_NORM_TOL = 1e-3


@dataclass
class Embeddings:
    """Row i of every ``train_*`` tensor belongs to global train id i (``order['train'][i]``)."""

    train_image: torch.Tensor
    train_text: torch.Tensor
    train_query: torch.Tensor
    val_image: torch.Tensor
    val_text: torch.Tensor
    val_query: torch.Tensor
    order: dict[str, list[int]]

    @property
    def dim(self) -> int:
        return int(self.train_query.shape[1])

    @property
    def candidates(self) -> torch.Tensor:
        """Candidate (ICD) embedding of every train item: its query row (DESIGN.md)."""
        return self.train_query

    def get(self, split: str, kind: str) -> torch.Tensor:
        if split not in SPLITS or kind not in KINDS:
            raise KeyError(f"no embedding {split}_{kind}; splits {SPLITS}, kinds {KINDS}")
        return getattr(self, f"{split}_{kind}")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSOR_NAMES}


def query_embedding(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """normalize(normalize(image) + normalize(text)): the normalized mean of the two modalities."""
    img = torch.nn.functional.normalize(image.float(), dim=-1)
    txt = torch.nn.functional.normalize(text.float(), dim=-1)
    return torch.nn.functional.normalize(img + txt, dim=-1)


def save_embeddings(directory: Path, emb: Embeddings) -> None:
    """Write both files atomically (tensors first, then order, which readers check against)."""
    from safetensors.torch import save

    _validate(emb, Path(directory) / EMBEDDINGS_FILE)
    blob = save({k: v.contiguous().float() for k, v in emb.tensors().items()}, metadata={"format": "pt"})
    atomic_write_bytes(Path(directory) / EMBEDDINGS_FILE, blob)
    atomic_write_json(Path(directory) / ORDER_FILE, {s: list(emb.order[s]) for s in SPLITS})


def _validate(emb: Embeddings, path: Path) -> None:
    dim: Optional[int] = None
    for split in SPLITS:
        n = len(emb.order.get(split, []))
        for kind in KINDS:
            name = f"{split}_{kind}"
            t = emb.get(split, kind)
            if t.dtype != torch.float32:
                raise StageError(f"{path}: tensor {name} should be float32, got {t.dtype}")
            if t.ndim != 2:
                raise StageError(f"{path}: tensor {name} should be 2-D [N, d], got shape {tuple(t.shape)}")
            if t.shape[0] != n:
                raise StageError(f"{path}: tensor {name} has {t.shape[0]} rows but {ORDER_FILE} lists {n} {split} items")
            if dim is None:
                dim = int(t.shape[1])
            elif t.shape[1] != dim:
                raise StageError(f"{path}: tensor {name} has dim {t.shape[1]}, expected {dim}")
            if n and not torch.allclose(t.norm(dim=1), torch.ones(n), atol=_NORM_TOL):
                raise StageError(f"{path}: rows of {name} are not L2-normalized")


def load_embeddings(directory: Path | str, expected_order: Optional[dict[str, list[int]]] = None) -> Embeddings:
    """Load and validate an export-embeddings artifact.

    ``expected_order`` (e.g. from the dataset index) makes the reader also check that the rows are
    in that question_id order.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    path, order_path = directory / EMBEDDINGS_FILE, directory / ORDER_FILE
    for p in (path, order_path):
        if not p.is_file():
            raise StageError(f"embeddings: file not found: {p}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise StageError(f"{path}: unreadable safetensors file: {e}") from None
    try:
        order_doc = json.loads(order_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StageError(f"{order_path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    order: dict[str, list[int]] = {}
    for split in SPLITS:
        ids = order_doc.get(split) if isinstance(order_doc, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise StageError(f"{order_path}: field {split!r} should be a list of question_ids")
        order[split] = ids
    missing = [n for n in TENSOR_NAMES if n not in tensors]
    if missing:
        raise StageError(f"{path}: missing tensor(s) {missing}")
    emb = Embeddings(**{n: tensors[n] for n in TENSOR_NAMES}, order=order)
    _validate(emb, path)
    if expected_order is not None:
        for split in SPLITS:
            want = list(expected_order.get(split, []))
            if order[split] != want:
                first = next((i for i, (a, b) in enumerate(zip(order[split], want)) if a != b), min(len(want), len(order[split])))
                raise StageError(
                    f"{order_path}: {split} order differs from the dataset at position {first} "
                    f"({len(order[split])} vs {len(want)} items); re-run export-embeddings for this dataset"
                )
    return emb
