"""Datasets: the official OKVQA/VQAv2 loader, the synthetic generator and the prepare-data index."""

from lever.data.dataset import DatasetIndex, VQARecord, load_index, load_split, write_index

__all__ = ["DatasetIndex", "VQARecord", "load_index", "load_split", "write_index"]
