#!/usr/bin/env bash
# The grid and the evaluation reports behind docs/own-images.md, from one run on a folder:
#   bash docs/make_own_images.sh RUN_DIR [GRID_PNG]
# e.g. bash docs/make_own_images.sh runs/emoji-15min docs/img/emoji-15min.png
set -euo pipefail
run="$1"
grid="${2:-$run/grid.png}"
# the grid and the model row use the run's default sampler (DPM-Solver++(2M), 10 steps, Karras sigmas)
ddpmkit sample "$run" --n 72 --seed 0 --out "$grid"
ddpmkit eval "$run" --n 1000 --nll-n 100 --nll-stride 10 --out "$run/eval-default.json"
# the real images framed as the run saw them: --reference RUN takes its data dir, size, --fit and --background
ddpmkit eval --reference "$run" --n 1000 --out "$run/eval-reference.json"
ddpmkit eval --reference "$run" --blur 1 --n 1000 --out "$run/eval-reference-blur1.json"
