#!/usr/bin/env bash
# The evaluation reports behind docs/results.md, from one run directory:
#   bash docs/make_tables.sh RUN_DIR
# The same four evaluations as bench/headline.py (which also trains the run and writes the table).
# Bits/dim: -log p(x|y) and -log p(x) on 1,000 test images each (`--nll-n auto` would take 100 on a CPU).
set -euo pipefail
run="$1"
ddpmkit eval "$run" --n 1000 --nll-n 1000 --nll-stride 10 --out "$run/eval-ddim50.json"
ddpmkit eval "$run" --n 1000 --sampler dpm++ --steps 15 --nll-n 0 --out "$run/eval-dpmpp15.json"
ddpmkit eval --reference fashion-mnist --n 1000 --out "$run/eval-reference.json"
ddpmkit eval --reference fashion-mnist --blur 1 --n 1000 --out "$run/eval-reference-blur1.json"
