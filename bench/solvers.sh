#!/usr/bin/env bash
# DPM-Solver++(2M) at 15 steps against DDIM at 50 and 100 on one trained run, 1,000 samples each:
#   bash bench/solvers.sh RUN_DIR [OUT_DIR]     # eval reports -> OUT_DIR (bench/results/solvers)
# Prints FD_dom of each (domain metrics; no bits/dim, no Inception).
set -euo pipefail
run=${1:?usage: bash bench/solvers.sh RUN_DIR [OUT_DIR]}
out=${2:-bench/results/solvers}
mkdir -p "$out"
PY=${PYTHON:-python}
ev() { $PY -m ddpmkit eval "$run" --n "${N:-1000}" --nll-n 0 --inception off --no-progress --out "$out/$1.json" "${@:2}" >/dev/null; }
ev ddim-50 --sampler ddim --steps 50
ev ddim-100 --sampler ddim --steps 100
for spacing in uniform quadratic trailing; do
    ev "dpm++-15-$spacing" --sampler dpm++ --steps 15 --spacing "$spacing"
done
$PY - "$out" <<'PY'
import json, sys
from pathlib import Path
rows = {p.stem: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*.json"))}
ref = rows["ddim-100"]["results"]["domain"]["fd_dom"]
print("| sampler | FD_dom | vs DDIM-100 | precision | recall | cond. accuracy | eval seconds |")
print("|---|---|---|---|---|---|---|")
for name, r in rows.items():
    d = r["results"]["domain"]
    print(f"| {name} | {d['fd_dom']:.1f} | {d['fd_dom'] / ref:.2f}x | {d['precision']:.3f} | {d['recall']:.3f} "
          f"| {d['conditional_accuracy']:.3f} | {r['seconds']:.0f} |")
PY
