"""Campaigns: many plans and hyperparameter sweeps run as one job against one baseline, with one
leaderboard corrected for the number of comparisons (see ``schema.py`` for the file format)."""
