#!/usr/bin/env bash
# Create .venv (if needed) and install mixshow with the versions this project is tested with.
# Byte-compiled at install (pip's default) on purpose: with PYTHONDONTWRITEBYTECODE set, as on this machine,
# `--no-compile` made every process compile torch and diffusers again at import (the suite went from 9.6 to 12 min).
# torch is installed first from its pin (PyPI's Linux wheel is the CUDA build). CPU-only machines: set
# MIXSHOW_TORCH_INDEX to PyTorch's CPU wheel index; MIXSHOW_TORCH replaces the requirement itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${MIXSHOW_TORCH:-torch==2.13.0}" \
    ${MIXSHOW_TORCH_INDEX:+--index-url "$MIXSHOW_TORCH_INDEX"}
CONSTRAINTS=constraints.txt
if [ -n "${MIXSHOW_TORCH:-}" ]; then  # the chosen torch stays: drop the project's own torch pin
    grep -v '^torch==' constraints.txt > .venv/constraints-own-torch.txt
    CONSTRAINTS=.venv/constraints-own-torch.txt
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" -e ".[test]"
