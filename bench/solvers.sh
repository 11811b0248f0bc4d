#!/usr/bin/env bash
# DPM-Solver++(2M) at 15 steps (three spacings) against DDIM at 50 and 100 on one trained run, 1,000 samples each:
#   bash bench/solvers.sh RUN_DIR [OUT_DIR]                  # eval reports -> OUT_DIR (bench/results/solvers)
#   SEEDS="0 1 2 3 4" bash bench/solvers.sh RUN_DIR OUT_DIR  # repeated over sampling seeds (x_T and noise)
# Writes OUT_DIR/<row>-seed<S>.json per row and seed, and prints FD_dom of each row: the mean over the
# seeds, its spread (sd) and the ratio to DDIM-100 within each seed (domain metrics; no bits/dim, no Inception).
# N (1000) sets the images per evaluation. A difference between rows is worth reading only where it is
# larger than the spread over seeds.
set -euo pipefail
run=${1:?usage: [SEEDS="0 1 2"] bash bench/solvers.sh RUN_DIR [OUT_DIR]}
out=${2:-bench/results/solvers}
mkdir -p "$out"
PY=${PYTHON:-python}
for seed in ${SEEDS:-0}; do
    ev() {
        $PY -m ddpmkit eval "$run" --n "${N:-1000}" --seed "$seed" --nll-n 0 --inception off --no-progress \
            --out "$out/$1-seed$seed.json" "${@:2}" >/dev/null
    }
    ev ddim-50 --sampler ddim --steps 50 --spacing uniform
    ev ddim-100 --sampler ddim --steps 100 --spacing uniform
    for spacing in uniform quadratic trailing; do
        ev "dpm++-15-$spacing" --sampler dpm++ --steps 15 --spacing "$spacing"
    done
done
$PY - "$out" <<'PY'
import json, re, statistics, sys
from pathlib import Path

runs = {}  # row -> {seed: report}
for p in sorted(Path(sys.argv[1]).glob("*.json")):
    m = re.fullmatch(r"(.+?)(?:-seed(\d+))?", p.stem)  # files without -seedS: one run at the report's seed
    report = json.loads(p.read_text())
    runs.setdefault(m[1], {})[int(m[2]) if m[2] else report["seed"]] = report
ref = {seed: r["results"]["domain"]["fd_dom"] for seed, r in runs["ddim-100"].items()}


def mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


print("| sampler | seeds | FD_dom mean | FD_dom sd | vs DDIM-100 (same seed) | precision | recall | cond. accuracy |")
print("|---|---|---|---|---|---|---|---|")
for name, by_seed in runs.items():
    d = {seed: r["results"]["domain"] for seed, r in sorted(by_seed.items())}
    fd, sd = mean_sd([v["fd_dom"] for v in d.values()])
    ratio, ratio_sd = mean_sd([v["fd_dom"] / ref[s] for s, v in d.items() if s in ref] or [float("nan")])
    cells = [statistics.mean(v[k] for v in d.values()) for k in ("precision", "recall", "conditional_accuracy")]
    spread = (lambda v, f: "—" if v != v else format(v, f))  # nan (one seed) -> a dash
    print(f"| {name} | {','.join(map(str, d))} | {fd:.1f} | {spread(sd, '.1f')} | {ratio:.2f}x ± {spread(ratio_sd, '.2f')} "
          + "".join(f"| {c:.3f} " for c in cells) + "|")
PY
