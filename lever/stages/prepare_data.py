"""``prepare-data`` stage: official files (or a freshly generated synthetic set) -> ``dataset.json``.

The synthetic set is written in the official layout inside the artifact first and then read back
through the same loader as OKVQA, so the tiny profile exercises the real loading path.
"""

from __future__ import annotations

from pathlib import Path

from lever.config.schema import DataConfig
from lever.data.dataset import DatasetIndex, load_split, write_index
from lever.data.synthetic import SyntheticLayout, write_synthetic
from lever.errors import StageError
from lever.context import StageContext


def _official(cfg: DataConfig) -> DatasetIndex:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise StageError(f"data.root: dataset folder not found: {root} (dataset {cfg.dataset!r})")
    train = load_split(root / cfg.train_questions, root / cfg.train_annotations, root / cfg.train_images, cfg.max_train)
    val = load_split(root / cfg.val_questions, root / cfg.val_annotations, root / cfg.val_images, cfg.max_val)
    source = {
        "dataset": cfg.dataset,
        "root": str(root.resolve()),
        "files": {k: getattr(cfg, k) for k in ("train_questions", "train_annotations", "train_images",
                                                 "val_questions", "val_annotations", "val_images")},
        "max_train": cfg.max_train,
        "max_val": cfg.max_val,
    }
    return DatasetIndex(cfg.dataset, train, val, source)


def _synthetic(cfg: DataConfig, out: Path) -> DatasetIndex:
    spec = cfg.synthetic
    layout: SyntheticLayout = write_synthetic(out, spec.n_train, spec.n_val, spec.image_size, spec.seed,
                                                     spec.planted_fraction, spec.planted_noise)
    train = load_split(layout.questions("train"), layout.annotations("train"), layout.images("train"), cfg.max_train)
    val = load_split(layout.questions("val"), layout.annotations("val"), layout.images("val"), cfg.max_val)
    source = {"dataset": "synthetic", **spec.model_dump(), "max_train": cfg.max_train, "max_val": cfg.max_val}
    return DatasetIndex("synthetic", train, val, source)


def prepare_data(ctx: StageContext) -> None:
    """Build the dataset index for ``ctx.plan.data`` into ``ctx.out/dataset.json``."""
    cfg = ctx.plan.data
    out = Path(ctx.out)
    out.mkdir(parents=True, exist_ok=True)
    official = cfg.dataset != "synthetic"
    index = _official(cfg) if official else _synthetic(cfg, out)
    if not index.train:
        raise StageError("data: the train split is empty")
    if not index.val:
        raise StageError("data: the val split is empty")
    write_index(out, index, data_root=Path(cfg.root).expanduser() if official else None)
    ctx.log.info("prepare-data: %s train=%d val=%d", index.name, len(index.train), len(index.val))
    ctx.telemetry.progress(len(index.train) + len(index.val), len(index.train) + len(index.val))
