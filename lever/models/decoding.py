"""Greedy decoding that no checkpoint can change.

Why: ``generate`` fills every generation setting the caller leaves unset (``None``) from the
checkpoint's ``generation_config.json`` -- even when the caller passes its own GenerationConfig.
Qwen2.5-VL's hub file turns on sampling with a near-zero temperature and a 1.05 repetition
penalty.  The penalty pushes down every token already in the prompt, including the ICDs'
answers, so it changed greedy answers exactly where copying an ICD's answer was right, biasing
RL verdicts and inference accuracy against the thing the selector is supposed to learn.

So inference and RL verdicts decode with :func:`greedy_config`: every field that can alter the
argmax set explicitly to its neutral value, and the model's own ``generation_config`` replaced by
the same neutral config when it is loaded (:func:`neutralize`), so nothing is left to inherit.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

log = logging.getLogger(__name__)

# fields that change which token greedy decoding picks (or when it stops), at neutral values;
# None-valued fields here are ones whose neutral value *is* None (no suppression, no forcing)
NEUTRAL: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "length_penalty": 1.0,
    "diversity_penalty": 0.0,
    "temperature": 1.0,
    "top_k": None,
    "top_p": 1.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_length": 0,
    "min_new_tokens": None,
    "remove_invalid_values": False,
    "renormalize_logits": False,
    "use_cache": True,
}
# fields whose checkpoint value would matter although they are unset (None) by default
_DROPPED = ("bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "sequence_bias", "forced_bos_token_id",
            "forced_eos_token_id", "exponential_decay_length_penalty", "min_p", "top_h", "watermarking_config",
            "guidance_scale", "low_memory", "penalty_alpha", "dola_layers", "constraints", "force_words_ids",
            "max_length", "max_time", "stop_strings")


def greedy_config(max_new_tokens: int, pad_token_id: int, eos_token_id: Any):
    """A GenerationConfig for plain greedy decoding of ``max_new_tokens`` tokens."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                           **{k: v for k, v in NEUTRAL.items() if v is not None})
    for k, v in NEUTRAL.items():  # None must be set explicitly: the constructor skips it
        if v is None:
            setattr(cfg, k, None)
    return cfg


def sampling_overrides(generation_config: Any) -> dict[str, Any]:
    """What a checkpoint's generation config sets away from neutral greedy decoding."""
    d = generation_config.to_dict() if generation_config is not None else {}
    out = {}
    for k, v in NEUTRAL.items():
        if k in d and d[k] is not None and v is not None and d[k] != v:
            out[k] = d[k]
    for k in _DROPPED:
        if d.get(k) not in (None, False, [], {}) and k != "max_length":
            out[k] = d[k]
    return out


def neutralize(model: Any, pad_token_id: int, eos_token_id: Any, max_new_tokens: Optional[int] = None) -> dict[str, Any]:
    """Replace ``model.generation_config`` with :func:`greedy_config`; returns (and logs once)
    what the checkpoint's own config had set, which is now ignored."""
    dropped = sampling_overrides(getattr(model, "generation_config", None))
    if dropped:
        log.info("ignoring the checkpoint's generation settings %s: Lever decodes greedily", dropped)
    model.generation_config = greedy_config(max_new_tokens or 1, pad_token_id, eos_token_id)
    return dropped
