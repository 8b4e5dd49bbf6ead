"""Kept for imports: the atomic-write helpers live in :mod:`lever.io`."""

from lever.io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text"]
