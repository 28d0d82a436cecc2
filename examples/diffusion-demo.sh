#!/usr/bin/env bash
# The guided diffusion backend end to end on a CPU (about 7 minutes on 2 cores):
#   1. render a 192-image DRR training set at 64 px (boxes and masks exact),
#   2. make a tiny chexforge pipeline (random weights), fit its VAE and train it on those images,
#   3. generate with `backend: diffusion`: text-guided cohorts and box-guided ones.
# The result is a 64-px proof that every part works, not a clinical-quality model: for that,
# train the `small` or `chexgen-xl` preset on real radiographs on a GPU, or import ChexGen.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-out/diffusion-demo}
mkdir -p "$OUT"
$BIN/chexforge generate examples/diffusion/drr-training-set.yaml --out "$OUT/drr" --no-progress
[ -f "$OUT/tiny/model_index.json" ] || $BIN/chexforge models init --preset tiny --out "$OUT/tiny"
$BIN/chexforge train --model "$OUT/tiny" --data "$OUT/drr/manifest.parquet" --run "$OUT/run" \
  --steps 1500 --batch-size 32 --lr 5e-4 --save-every 500 --vae-steps 800 --control-dropout 0.5
# --control-dropout 0.5: half the images train with the empty control image, so the captions carry
# the findings too (text-only cohorts); with 0.1 the model learned effusions mostly through the mask
# (bench/diffusion_learns.py, docs/benchmarks.md). The EMA's warm-up replaces the old --ema 0.995.
$BIN/chexforge models info "$OUT/run/model"
$BIN/chexforge generate examples/diffusion/generate.yaml --out "$OUT/generated"
$BIN/chexforge inspect "$OUT/generated"
