"""Selectors: the v2/v3 pointer selector, its shared log-prob function, decoding and checkpoints."""

from lever.selectors.checkpoint import load_checkpoint, save_checkpoint
from lever.selectors.pointer import (
    PointerSelector,
    beam_search,
    build_selector,
    greedy,
    sample,
    sequence_logprob,
    step_logprobs,
)

__all__ = [
    "PointerSelector", "beam_search", "build_selector", "greedy", "load_checkpoint", "sample",
    "save_checkpoint", "sequence_logprob", "step_logprobs",
]
