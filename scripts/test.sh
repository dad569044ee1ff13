#!/usr/bin/env bash
# The whole test suite (lint + tests), on a fresh machine too: installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache
# two workers: the machine (and CI) has 2 cores, and each test runs single-threaded; one test at a time to each
# worker, longest first (tests/conftest.py), so the long end-to-end tests do not end up one after another
.venv/bin/python -m pytest -q -n 2 --maxschedchunk 1 --durations=15 "$@"
