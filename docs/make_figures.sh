#!/usr/bin/env bash
# Make the trained-model pictures and evaluation reports of docs/ from one run directory.
#   bash docs/make_figures.sh RUN_DIR
# (the run used in docs/: `ddpmkit train --dataset fashion-mnist --minutes 15 --out RUN_DIR`)
set -euo pipefail
run="$1"
img="$(dirname "$0")/img"
tmp="$(mktemp -d)"
mkdir -p "$img"
ddpmkit sample "$run" --n 100 --seed 0 --out "$img/samples.png"
ddpmkit sample "$run" --sampler dpm++ --steps 15 --spacing quadratic --n 50 --seed 0 --out "$tmp/dpmpp15.png"
ddpmkit sample "$run" --sampler ddim --steps 100 --n 50 --seed 0 --out "$tmp/ddim100.png"
python -c "from ddpmkit import viz; viz.montage(['$tmp/dpmpp15.png', '$tmp/ddim100.png'], '$img/dpmpp15_vs_ddim100.png', titles=['DPM-Solver++(2M), 15 steps', 'DDIM, 100 steps'])"
for w in 0 1 3; do
  ddpmkit sample "$run" --guidance "$w" --n 50 --seed 0 --out "$tmp/guidance-$w.png"
done
python -c "from ddpmkit import viz; viz.montage(['$tmp/guidance-0.png', '$tmp/guidance-1.png', '$tmp/guidance-3.png'], '$img/guidance.png', titles=['w = 0', 'w = 1', 'w = 3'])"
ddpmkit animate "$run" --n 20 --sampler ddim --steps 50 --frames both --every 2 --fps 8 --out "$img/denoise.gif"
cp "$run/loss.png" "$img/loss.png"
rm -rf "$tmp"
