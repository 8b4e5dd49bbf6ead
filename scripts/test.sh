#!/usr/bin/env bash
# Installs Lever with its test tools into .venv and runs the whole test suite.
# Exit status is pytest's, except that "no tests collected" (exit 5) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
. .venv/bin/activate
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
