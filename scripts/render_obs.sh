#!/usr/bin/env bash
# Regenerates the observability files the Helm chart ships, from lever/obs (single source):
#   helm/lever/files/alert-rules.yaml  (plain rules file = the PrometheusRule's spec)
#   helm/lever/files/dashboard.json    (Grafana dashboard for the sidecar ConfigMap)
# Run after changing lever/obs/alerts.py, lever/obs/dashboard.py or AlertConfig defaults;
# tests/test_obs_render.py fails while the shipped files are stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
mkdir -p helm/lever/files
"$PY" -m lever alerts render --format rules --out helm/lever/files/alert-rules.yaml
"$PY" -m lever dashboard render --out helm/lever/files/dashboard.json
if command -v promtool >/dev/null; then
  promtool check rules helm/lever/files/alert-rules.yaml
fi
