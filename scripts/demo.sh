#!/usr/bin/env bash
# The main job on its embedded default: build the tiny base, make a toy concept, train it, sample it.
# Everything lands in ./demo-out (delete it to start over). Runs on the CPU in about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
M=.venv/bin/mixshow
OUT=demo-out
rm -rf "$OUT" && mkdir -p "$OUT"
$M make-tiny-base "$OUT/tiny-sd"
$M make-toy-concepts "$OUT/toys" --n 3
$M train --base "$OUT/tiny-sd" --data "$OUT/toys/red-circle" --words "<redcir1> <redcir2>" --class-word toy \
  --out "$OUT/red-circle" --steps 200 --resolution 64 --sample-every 100 --device cpu
$M sample --base "$OUT/tiny-sd" --concept "$OUT/red-circle" --prompt "a photo of a <TOK> on the beach" \
  --steps 20 --height 64 --width 64 --seed 1 --out "$OUT/red-circle-beach.png" --device cpu
echo "demo done: package $OUT/red-circle, preview grid $OUT/red-circle/samples/final.png, image $OUT/red-circle-beach.png"
