"""Qwen2.5-VL's vision tower over a batch of same-size images, as batched tensor ops.

The model's own forward (``get_image_features``) packs all images into one sequence and, with
SDPA, runs attention image by image and window by window in a Python loop; it also rebuilds the
window permutation and rotary positions in Python on every call and embeds patches with a
``Conv3d`` whose kernel equals its stride.  When the fast scoring path encodes a query pool, the
images mostly share one grid, so the same computation can run as a few large operations:

* per grid, the window permutation, window lengths and rotary tables are computed once (by the
  model's own helpers in ``transformers.vision_utils``) and cached;
* the patch embedding is a matrix product with the convolution's weights (a stride-equal-kernel
  convolution is exactly that), which is much cheaper than the generic 3-D convolution kernel;
* attention runs over [images x windows, heads, window length, head dim] with one SDPA call per
  distinct window length (windows at the right and bottom edges are shorter), and the
  full-attention blocks over [images x frames, heads, patches, head dim].

Norms, projections, MLPs and the patch merger are the model's modules, called on the batch.
The result equals ``get_image_features`` up to float summation order (tests compare them).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F


class _Layout:
    """What the tower needs about one (t, h, w) grid, independent of the pixels."""

    def __init__(self, visual: Any, grid: tuple[int, int, int]) -> None:
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
        from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

        t, h, w = grid
        g = torch.tensor([grid], dtype=torch.long)
        unit = visual.spatial_merge_unit
        self.patches = t * h * w
        self.frame = h * w
        window_index, cu = get_vision_window_index(
            g, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size)
        self.window_index = window_index
        self.reverse = torch.argsort(window_index)
        # patch order inside the tower: merge units in window order
        self.order = (window_index[:, None] * unit + torch.arange(unit)).reshape(-1)
        # windows grouped by length: {length: [n_windows, length] patch positions}
        starts, lens = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
        self.windows: dict[int, torch.Tensor] = {}
        for n in sorted(set(lens.tolist())):
            s = starts[lens == n]
            self.windows[n] = s[:, None] + torch.arange(n)
        pos = get_vision_position_ids(g, visual.spatial_merge_size)
        ref = torch.empty(self.patches, 1)
        cos, sin = visual.rotary_pos_emb(ref, pos)
        self.cos, self.sin = cos[self.order], sin[self.order]
        self.rotary = qwen.apply_rotary_pos_emb_vision


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: dict[int, torch.Tensor],
               scale: float) -> torch.Tensor:
    """Attention of [N, P, H, d] inputs inside each segment ({length: [n, length] positions});
    returns [N, P, H, d]."""
    N, P, H, d = q.shape
    if len(segments) == 1:
        (n, idx), = segments.items()
        if idx.shape[0] * n == P and bool((idx.reshape(-1) == torch.arange(P)).all()):
            # equal, contiguous segments (one window per image is the common case): a reshape
            shape = (N * idx.shape[0], n, H, d)
            out = F.scaled_dot_product_attention(*(x.reshape(shape).transpose(1, 2) for x in (q, k, v)),
                                                 scale=scale)
            return out.transpose(1, 2).reshape(N, P, H, d)
    out = torch.empty_like(q)
    for n, idx in segments.items():
        flat = idx.reshape(-1).to(q.device)
        shape = (N * idx.shape[0], n, H, d)
        sel = [x[:, flat].reshape(shape).transpose(1, 2) for x in (q, k, v)]
        o = F.scaled_dot_product_attention(*sel, scale=scale)
        out[:, flat] = o.transpose(1, 2).reshape(N, -1, H, d)
    return out


class BatchedVision:
    """Merged vision features of same-grid images, several images per pass.

    ``for_model`` hands out one instance per vision tower, so the per-grid layouts are computed
    once per process rather than once per scorer."""

    _instances: "weakref.WeakKeyDictionary[Any, BatchedVision]" = weakref.WeakKeyDictionary()

    @classmethod
    def for_model(cls, visual: Any) -> "BatchedVision":
        inst = cls._instances.get(visual)
        if inst is None:
            inst = cls._instances[visual] = cls(visual)
        return inst

    def __init__(self, visual: Any) -> None:
        self.visual = visual
        self._layouts: dict[tuple[int, int, int], _Layout] = {}
        embed = visual.patch_embed
        self._embed_weight = embed.proj.weight.reshape(embed.embed_dim, -1)

    def layout(self, grid: tuple[int, int, int]) -> _Layout:
        lay = self._layouts.get(grid)
        if lay is None:
            lay = self._layouts[grid] = _Layout(self.visual, grid)
        return lay

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, grid: tuple[int, int, int], n_images: int) -> torch.Tensor:
        """``pixel_values``: the images' patches concatenated [n_images x patches, C*T*p*p];
        returns [n_images, merged tokens, out hidden], each image's tokens in its own order."""
        vis = self.visual
        lay = self.layout(grid)
        N, P = n_images, lay.patches
        dev = pixel_values.device
        w = self._embed_weight
        x = (pixel_values.to(w.dtype) @ w.t()).reshape(N, P, -1)[:, lay.order.to(dev)]
        cos, sin = lay.cos.to(dev), lay.sin.to(dev)
        full = {lay.frame: torch.arange(P).reshape(-1, lay.frame)}
        for i, blk in enumerate(vis.blocks):
            attn = blk.attn
            hs = blk.norm1(x)
            q, k, v = attn.qkv(hs).reshape(N, P, 3, attn.num_heads, -1).unbind(2)
            q, k = lay.rotary(q, k, cos, sin)
            segments = full if i in vis.fullatt_block_indexes else lay.windows
            o = _attention(q, k, v, segments, attn.scaling)
            x = x + attn.proj(o.reshape(N, P, -1))
            x = x + blk.mlp(blk.norm2(x))
        merged = vis.merger(x.reshape(N * P, -1)).reshape(N, P // vis.spatial_merge_unit, -1)
        return merged[:, lay.reverse.to(dev)]
