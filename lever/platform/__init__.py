"""Kubernetes side of Lever: Argo manifests built with Hera from the stage graph, offline checks.

* ``workflows`` -- the ``lever-pipeline`` WorkflowTemplate and per-plan Workflows;
* ``cron`` -- the nightly regression CronWorkflow;
* ``pods`` -- pod-level pieces every template shares (retries, security, volumes, env);
* ``render`` -- every committed generated file (``workflows/``, ``helm/lever/files/``);
* ``regress`` -- re-exports the regression verdict (``lever.report.regression``) ``lever regress`` uses;
* ``validation`` / ``dockerfile`` -- offline validation with the official schemas, Dockerfile policy.

Nothing here imports torch.
"""
