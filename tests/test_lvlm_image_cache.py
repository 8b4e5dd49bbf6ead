"""The processed-image cache is bounded in bytes (not entries) and holds pixels in the model dtype."""

from __future__ import annotations

import torch
from PIL import Image

from lever.models.image_cache import ImageCache, nbytes


def test_cache_evicts_least_recently_used_by_bytes():
    cache = ImageCache(max_bytes=3 * 400)  # room for three 100-float32 tensors
    made = []

    def make(i):
        def _m():
            made.append(i)
            return torch.zeros(100)
        return _m

    for i in range(3):
        cache.get_or(i, make(i))
    assert cache.bytes == 1200 and len(cache) == 3
    cache.get_or(0, make(0))  # a hit refreshes 0
    cache.get_or(3, make(3))  # over budget: 1, the least recently used, goes
    assert 1 not in cache and {0, 2, 3} <= set(k for k in (0, 2, 3) if k in cache)
    assert cache.bytes == 1200 and cache.evictions == 1 and made == [0, 1, 2, 3]
    big = cache.get_or(9, lambda: torch.zeros(1000))  # larger than the whole budget: returned, not kept
    assert big.numel() == 1000 and 9 not in cache and cache.bytes == 1200
    assert cache.get_or(None, lambda: torch.ones(1)).item() == 1.0 and len(cache) == 3


def test_lvlm_keeps_pixels_in_model_dtype_within_the_byte_budget(tmp_path):
    from lever.config.schema import LVLMConfig
    from lever.models.factory import build_lvlm

    cfg = LVLMConfig(kind="tiny_qwen2_5_vl", name="t", revision=None, dtype="bfloat16", device="cpu", warmup_steps=0,
                     min_pixels=3136, max_pixels=12544, image_cache_mb=0.5)
    lvlm = build_lvlm(cfg, cache=False)
    paths = []
    for i in range(12):
        p = tmp_path / f"im{i}.png"
        Image.new("RGB", (112, 112), (20 * i, 0, 0)).save(p)
        paths.append(p)
    first = lvlm.process_image(paths[0])
    assert first.pixel_values.dtype == torch.bfloat16
    per_image = nbytes(first)
    for p in paths:
        lvlm.process_image(p)
    assert lvlm._images.bytes <= 0.5 * 2**20 < 12 * per_image  # the budget, not the count, decides
    assert 0 < len(lvlm._images) < 12 and lvlm._images.evictions > 0
    assert lvlm.process_image(paths[-1]) is lvlm.process_image(paths[-1])  # recent ones stay cached
