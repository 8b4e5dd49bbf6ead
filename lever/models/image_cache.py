"""A least-recently-used cache bounded by the bytes of the tensors it holds.

Why bytes and not entries: the processed-image cache used to keep 8192 entries.  A tiny
synthetic image is a few KB of pixels, a COCO image at Qwen2.5-VL's 448x448 bound is ~3 MB in
fp32 (1024 patches x 1176 values), so the same count meant megabytes in CI and tens of GB of host
memory on the cluster.  Entries are evicted, least recently used first, until the total fits.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional

import torch


def nbytes(value: Any) -> int:
    """Bytes of the tensors reachable from ``value`` (a tensor, or an object's tensor fields)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    fields = getattr(value, "__dict__", None)
    if isinstance(fields, dict):
        return sum(v.numel() * v.element_size() for v in fields.values() if isinstance(v, torch.Tensor))
    return 0


class ImageCache:
    """``get_or(key, make)`` like ``prompting.LRU``, bounded by ``max_bytes`` of tensor data.

    A value larger than the whole budget is returned but not kept; ``None`` keys are never
    cached (in-memory images have no stable identity)."""

    def __init__(self, max_bytes: int, size_of: Callable[[Any], int] = nbytes) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.size_of = size_of
        self.bytes = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> Optional[Any]:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def get_or(self, key: Optional[Hashable], make: Callable[[], Any]) -> Any:
        if key is None:
            return make()
        item = self._items.get(key)
        if item is not None:
            self.hits += 1
            self._items.move_to_end(key)
            return item[0]
        self.misses += 1
        value = make()
        size = self.size_of(value)
        if size > self.max_bytes:
            return value
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped
            self.evictions += 1
        return value
