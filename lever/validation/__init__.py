"""``lever validate``: the checks the stages run on their inputs, runnable before a run.

Why a separate entry point: a bad RL-data shard or plan should be found in a second on a laptop,
not an hour into a GPU job.  Each kind calls the very function the consuming stage calls
(:func:`lever.config.load_plan`, :func:`lever.rl.data.read_rl_data`,
:func:`lever.selectors.checkpoint.load_checkpoint`, :func:`lever.validation.predictions.read_predictions_checked`)
so the verdicts cannot drift apart; the difference is that here every problem is collected and
printed instead of stopping at the first.
"""

from lever.validation.dispatch import KINDS, Problem, validate

__all__ = ["KINDS", "Problem", "validate"]
