#!/usr/bin/env bash
# Set up, train a small class-conditional model on Fashion-MNIST for $MINUTES (default 15)
# minutes, then draw a grid of samples (one row per class) into samples.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
run="${RUN_DIR:-runs/fashion-$(date +%Y%m%d-%H%M%S)}"
ddpmkit train --dataset fashion-mnist --minutes "${MINUTES:-15}" --out "$run"
ddpmkit sample "$run" --n 100 --out samples.png
echo "samples: samples.png   run directory: $run"
