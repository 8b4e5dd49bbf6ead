"""The batched vision tower equals the model's own ``get_image_features``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lever.models.fast_scoring import FastScorer
from lever.models.lvlm import Example
from lever.models.tiny_qwen import image_processor
from lever.models.vision_batch import BatchedVision

from lever_tiny_env import tiny_lvlm


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("size,n", [((56, 56), 1), ((448, 448), 3), ((252, 196), 4), ((336, 140), 2)])
def test_batched_tower_equals_the_models_forward(size, n):
    """One window per image (56x56), many equal windows (448x448), and grids whose edge windows
    are shorter (252x196, 336x140: windows of 3-4 different lengths)."""
    model = tiny_lvlm().model.model
    proc = image_processor(56 * 56, 448 * 448)
    outs = [proc(images=[im], return_tensors="pt") for im in _images([size] * n)]
    pv = torch.cat([o["pixel_values"] for o in outs])
    grid = torch.cat([o["image_grid_thw"] for o in outs])
    assert len({tuple(g.tolist()) for g in grid}) == 1
    with torch.inference_mode():
        ref = model.get_image_features(pv, grid, return_dict=True).pooler_output
    tower = BatchedVision(model.visual)
    g = tuple(int(x) for x in grid[0].tolist())
    got = tower(pv, g, n)
    assert got.shape[0] == n
    for r, x in zip(ref, got):
        assert r.shape == x.shape
        torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-4)  # fp32 reordering noise, scaled to the values
    if size != (56, 56) and size != (448, 448):
        assert len(tower.layout(g).windows) > 1  # the unequal-window path really ran


def test_batched_tower_keeps_images_apart():
    """Image i's features do not depend on the other images of the pass."""
    model = tiny_lvlm().model.model
    proc = image_processor(56 * 56, 448 * 448)
    outs = [proc(images=[im], return_tensors="pt") for im in _images([(252, 196)] * 3, seed=1)]
    grid = tuple(int(x) for x in outs[0]["image_grid_thw"][0].tolist())
    tower = BatchedVision(model.visual)
    together = tower(torch.cat([o["pixel_values"] for o in outs]), grid, 3)
    alone = tower(outs[1]["pixel_values"], grid, 1)[0]
    assert (together[1] - alone).abs().max().item() < 1e-5
    assert (together[0] - together[1]).abs().max().item() > 1e-3


def test_fast_scoring_with_images_of_several_grids_matches_the_plain_path():
    """In-memory images of different aspect ratios: several grids, one tower pass per grid."""
    lvlm = tiny_lvlm()
    ims = _images([(56, 56), (112, 308), (308, 112), (56, 56), (112, 308)], seed=2)
    icds = [Example(im, f"What is in picture {i}?", a) for i, (im, a) in enumerate(zip(ims[:4], ["red", "2", "circle", "blue"]))]
    q = Example(ims[4], "How many shapes are there?")
    prompts = [[q]] + [[c, q] for c in icds] + [[icds[0], c, q] for c in icds[1:]]
    fast = FastScorer(lvlm)
    got = fast.answer_logprob(prompts, ["2"] * len(prompts))
    ref = lvlm.answer_logprob(prompts, ["2"] * len(prompts))
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4
    grids = {tuple(lvlm.process_image(im).grid_thw.tolist()) for im in ims}
    assert len(grids) >= 2
    assert fast.vision_forwards == len(grids)
