"""Benchmarks and the cost model: measurements of the model code, kept out of it.

They drive the real model and sampling code (beam search, the fast scorer, batched generation)
on the same inputs two or three ways, so they sit above the domain packages; nothing in Lever's
pipeline imports them (``lever bench``, ``python -m lever.bench.cost_model`` and
``scripts/gpu_smoke.sh`` do).
"""
