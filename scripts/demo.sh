#!/usr/bin/env bash
# The main job on its embedded default: `mixshow demo` builds the tiny base and 3 toy concepts,
# runs a real Flower simulation with 3 clients (train, Grams, upload to a file:// store),
# fuses and publishes on the server side, pulls the fused version back and samples it.
# Everything lands in ./demo-out (removed first). A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
rm -rf demo-out
.venv/bin/mixshow demo --out demo-out "$@"
