"""The stage functions, one module per part of the pipeline: ``def stage(ctx: StageContext) -> None``.

They sit above the domain code they call (data, models, sampling, rl, training, inference,
report) and below the pipeline that builds their units (``lever.pipeline.graph`` names them as
``"lever.stages.<module>:<function>"``); ``lever stage``, the local runner and the Argo
container all call these same functions.
"""
