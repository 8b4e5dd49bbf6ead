#!/usr/bin/env bash
# Installs Lever with its test tools into .venv and runs the whole test suite.
# Exit status is pytest's; "no tests collected" (exit 5) is turned into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.lock -r requirements-test.lock
python -m pip install -q --no-deps -e .
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
