"""Evaluation metrics; ``vqa_accuracy`` is part of the stable public API (SPEC section 8)."""

from lever.metrics.vqa_metric import gt_answer_counts, normalize_answer, vqa_accuracy

__all__ = ["gt_answer_counts", "normalize_answer", "vqa_accuracy"]
