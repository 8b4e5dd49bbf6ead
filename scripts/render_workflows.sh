#!/usr/bin/env bash
# Regenerate the committed Argo manifests (workflows/*.yaml) and the chart's copies
# (helm/lever/files/lever-pipeline-template.yaml, lever-models-pull-template.yaml, nightly-cron.yaml)
# from lever.pipeline.graph.
# Run this by hand after changing the stage graph, lever/platform/ or a plan; CI never runs it:
# tests/test_k8s_workflows.py fails when the committed files drift from the code.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m lever render --all --out workflows/ --chart helm/lever
