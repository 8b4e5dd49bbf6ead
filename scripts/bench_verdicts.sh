#!/usr/bin/env bash
# Runs `lever bench verdicts` (plain, two-pass and one-pass RL-data verdicts on the same inputs, in one process).
# Usage: scripts/bench_verdicts.sh [options of `lever bench verdicts`]   (default: the tiny profile)
# Uses .venv when scripts/install.sh made one, else the python on PATH ($PYTHON overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
exec "$PY" -m lever bench verdicts "$@"
