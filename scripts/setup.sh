#!/usr/bin/env bash
# Create .venv (if needed) and install mixshow with the versions this project is tested with.
# CPU torch is installed first from its pin: a bare range would make pip pick a multi-GB CUDA build.
# GPU users: install your CUDA torch into .venv first; the pins below then leave it alone
# (or set MIXSHOW_TORCH to the torch requirement you want).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${MIXSHOW_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
