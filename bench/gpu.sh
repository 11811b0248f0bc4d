#!/usr/bin/env bash
# The GPU measurements, on a machine with one CUDA GPU and PyTorch already installed:
#
#   bash bench/gpu.sh tests     # the CUDA tests (tests/test_cuda.py)
#   bash bench/gpu.sh speed     # bench/speed.py --device cuda --batch 256 --compile
#   bash bench/gpu.sh quality   # --preset fashion-gpu: train STAGES x STAGE_MINUTES, eval after each stage
#
# Logs and results go to $OUT (default bench/_work/gpu). Run from the repository root; ddpmkit is
# taken from src/ (no install needed). The references for `speed` must be importable (bench/README.md).
# `quality` reads Fashion-MNIST from the usual places or $DDPMKIT_DATA_DIR, and the domain classifier
# from the ddpmkit cache ($XDG_CACHE_HOME/ddpmkit; trained there once if absent).
set -uo pipefail
OUT=${OUT:-bench/_work/gpu}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1

case "${1:-}" in
tests)
    $PY -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.log"
    ;;
speed)
    $PY bench/speed.py --device "$DEVICE" --batch "${BATCH:-256}" --compile --results-dir "$OUT" 2>&1 |
        tee "$OUT/speed.log"
    ;;
quality)
    run=${RUN:-bench/_work/gpu-run}
    stages=${STAGES:-3} minutes=${STAGE_MINUTES:-1} n=${N:-1000}
    if [ -e "$run" ]; then echo "bench/gpu.sh: $run exists; remove it or set RUN=another/dir" >&2; exit 2; fi
    for i in $(seq 1 "$stages"); do
        if [ "$i" = 1 ]; then start=(--preset "${PRESET:-fashion-gpu}"); else start=(--resume); fi
        $PY -m ddpmkit train "${start[@]}" --out "$run" --minutes "$minutes" --device "$DEVICE" --no-progress \
            ${TRAIN_FLAGS:-} || exit 1
        $PY -m ddpmkit eval "$run" --n "$n" --sampler ddim --steps 50 --spacing uniform --nll-n 0 --inception off --device "$DEVICE" --no-progress \
            --out "$OUT/eval-$i.json" || exit 1
    done
    $PY -m ddpmkit sample "$run" --n 100 --device "$DEVICE" --out "$OUT/samples.png"
    cp "$run/metrics.jsonl" "$OUT/metrics.jsonl"
    ;;
*)
    echo "usage: bash bench/gpu.sh tests|speed|quality" >&2
    exit 2
    ;;
esac
