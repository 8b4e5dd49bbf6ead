#!/usr/bin/env bash
# Installs Lever into .venv and runs one plan end to end on the tiny offline profile.
# Usage: scripts/run_plan.sh [PLAN] [extra `lever run` options]   (default plan: plan5)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
plan="${1:-plan5}"
shift || true
exec lever run "$plan" --profile tiny --store ./lever-store "$@"
