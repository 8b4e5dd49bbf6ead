"""CLIP-style image/text encoder used by ``export-embeddings``.

Two kinds share one interface:

* ``clip``: a pretrained ``CLIPModel`` + ``CLIPProcessor`` from the Hugging Face hub or a local
  path (``encoder.name``); the cluster profile's ViT-B/32.
* ``tiny_clip``: the same ``CLIPModel`` architecture built from a tiny ``CLIPConfig`` with weights
  seeded by ``encoder.seed``, a word-level tokenizer built here from the synthetic generator's
  vocabulary, and a PIL resize + CLIP-normalize image preprocessor. It downloads nothing, so the
  tiny profile and the tests run offline, and it is deterministic for a seed.

Both return L2-normalized float32 rows, so callers can take cosine similarity as a dot product.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from lever.config.schema import EncoderConfig
from lever.errors import StageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0..3; EOS must not be 2 (CLIP's legacy pooling)
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8
TINY_MAX_TOKENS = 32


class Encoder(Protocol):
    dim: int

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


def _features(out: object) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projection; 4.x a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise StageError(f"unexpected CLIP feature output type {type(out).__name__}")
    return pooled


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _ClipBase:
    """Shared forward passes; subclasses provide pixel and token tensors."""

    model: torch.nn.Module
    device: torch.device
    dim: int

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def _tokens(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            return torch.zeros(0, self.dim)
        pixels = self._pixels([im.convert("RGB") for im in images]).to(self.device)
        feats = _features(self.model.get_image_features(pixel_values=pixels))
        return _normalize(feats).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        toks = {k: v.to(self.device) for k, v in self._tokens(list(texts)).items()}
        feats = _features(self.model.get_text_features(**toks))
        return _normalize(feats).cpu()


class HFClipEncoder(_ClipBase):
    """A pretrained CLIP from a provisioned directory (a local directory, an s3:// snapshot, or a
    hub id at its pinned revision under ``models_root`` / in the Hugging Face cache)."""

    def __init__(self, cfg: EncoderConfig, device: torch.device | None = None, models_root: str | None = None):
        from transformers import CLIPModel, CLIPProcessor

        from lever.models.provision import ModelRef, resolve

        self.device = device or default_device()
        hint = ("Provision it with `lever models pull` or point encoder.name at a local directory in the hub "
                "layout; for offline runs use encoder.kind: tiny_clip.")
        try:
            directory = resolve(ModelRef("encoder", cfg.name, cfg.revision), models_root)
        except StageError as e:
            raise StageError(f"encoder.name: cannot load CLIP model {cfg.name!r} ({e}). {hint}") from None
        try:
            self.processor = CLIPProcessor.from_pretrained(str(directory), local_files_only=True)
            self.model = CLIPModel.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as e:
            raise StageError(
                f"encoder.name: cannot load CLIP model {cfg.name!r} from {directory} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). {hint}"
            ) from e
        self.model.eval().to(self.device)
        self.dim = int(self.model.config.projection_dim)

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    def _tokens(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def build_word_tokenizer(words: Sequence[str], max_length: int = TINY_MAX_TOKENS):
    """Word-level tokenizer: lowercase, split on whitespace and punctuation, unknown -> [UNK],
    wrapped as [BOS] ... [EOS] and padded with [PAD] (id 0) to the longest in the batch."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(set(words)):
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    tok.enable_padding(pad_id=vocab["[PAD]"], pad_token="[PAD]")
    tok.enable_truncation(max_length=max_length)
    return tok


class TinyClipEncoder(_ClipBase):
    """A tiny, seeded, randomly initialised CLIP; meaningful only as a deterministic feature map."""

    def __init__(self, cfg: EncoderConfig, device: torch.device | None = None):
        from transformers import CLIPConfig, CLIPModel

        from lever.data.synthetic import vocabulary

        self.device = device or torch.device("cpu")
        self.tokenizer = build_word_tokenizer(vocabulary())
        h = cfg.hidden_size
        heads = 2 if h % 2 == 0 else 1
        config = CLIPConfig(
            text_config=dict(
                vocab_size=self.tokenizer.get_vocab_size(), hidden_size=h, intermediate_size=2 * h,
                num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=TINY_MAX_TOKENS,
                pad_token_id=0, bos_token_id=SPECIAL_TOKENS.index("[BOS]"), eos_token_id=SPECIAL_TOKENS.index("[EOS]"),
            ),
            vision_config=dict(
                hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2, num_attention_heads=heads,
                image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE, num_channels=3,
            ),
            projection_dim=cfg.projection_dim,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = CLIPModel(config)
        self._spread(self.model)
        self.model.eval().to(self.device)
        self.dim = cfg.projection_dim
        self._mean = np.asarray(CLIP_MEAN, dtype=np.float32)
        self._std = np.asarray(CLIP_STD, dtype=np.float32)

    @staticmethod
    @torch.no_grad()
    def _spread(model: torch.nn.Module) -> None:
        """Let the content, not the initialisation, set the features.

        At random initialisation the pooled token of a CLIP tower is mostly its class and
        position embeddings, which every input shares: the tiny encoder's image embeddings had a
        mean pairwise cosine of 0.84, leaving what an image shows in small differences that a
        selector trained for a few hundred steps could not pull apart.  A zero class embedding
        and position embeddings at a tenth of their scale bring it to about 0.2, as content-
        dominated as a trained encoder's."""
        vision = model.vision_model.embeddings
        vision.class_embedding.zero_()
        vision.position_embedding.weight.mul_(0.1)
        model.text_model.embeddings.position_embedding.weight.mul_(0.1)

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        arrs = []
        for im in images:
            small = im.resize((TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), Image.Resampling.BICUBIC)
            a = np.asarray(small, dtype=np.float32) / 255.0
            arrs.append(((a - self._mean) / self._std).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(arrs))

    def _tokens(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        encs = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask}


def build_encoder(cfg: EncoderConfig, device: torch.device | None = None, models_root: str | None = None) -> Encoder:
    """The encoder named by ``cfg.kind`` (``models_root``: where provisioned snapshots live)."""
    if cfg.kind == "tiny_clip":
        return TinyClipEncoder(cfg, device)
    if cfg.kind == "clip":
        return HFClipEncoder(cfg, device, models_root)
    raise StageError(f"encoder.kind: unknown encoder {cfg.kind!r}")
