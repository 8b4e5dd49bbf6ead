#!/usr/bin/env bash
# Creates .venv (if missing) and installs Lever with pinned dependencies into it.
# Usage: scripts/install.sh [--test]   (--test adds the test tools)
# The locks list every transitive dependency, so they install with --no-deps: nothing unpinned can
# slip in, and `pip check` fails the install if a lock ever misses one.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
reqs=(-r requirements.lock)
if [ "${1:-}" = "--test" ]; then reqs+=(-r requirements-test.lock); fi
python -m pip install -q --no-deps "${reqs[@]}"
python -m pip install -q --no-deps -e .
python -m pip check
