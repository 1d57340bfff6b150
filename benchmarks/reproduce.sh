#!/usr/bin/env bash
# Reproduce BENCHMARKS.md on a machine with one CUDA GPU (the numbers there come from an H100 80GB).
#   benchmarks/reproduce.sh OUT_DIR
# Needs the package importable (./launch.sh sets it up, or PYTHONPATH=. with the dependencies installed),
# bitsandbytes for nf4, and nvidia-cuda-mps-control on PATH for the MPS rows. Each command below is one
# `coordinator bench` run; its bench.md repeats the command.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/benchmarks}
DATA=${DATA:-$OUT/data}
PY=${PYTHON:-python3}
if [[ ! -d "$DATA/dataset" ]]; then
    "$PY" -m coordinator make-demo "$DATA"
    # the lent GPU machine had no PyAV: the clips' PNG frame folders stand in for their mp4 files
    rm -rf "$DATA/dataset/mp4" "$DATA/dsec"
fi
IN="$DATA/dataset"
bench() { "$PY" -m coordinator bench --input "$IN" --synthetic-weights 7b --samples 10 --warmup 1 "$@"; }
bench --precision bf16 --max-new-tokens 50 --alphas 0,0.28,0.5,0.7,0.9,1.0 --oracle-profile seed \
      --bench-mps on,off --output-dir "$OUT/bf16-50"
bench --precision bf16 --max-new-tokens 200 --alphas 0,0.5,0.7,0.9,1.0 --oracle-profile seed \
      --bench-mps on --output-dir "$OUT/bf16-200"
bench --precision nf4 --max-new-tokens 50 --alphas 0,0.5,0.7,0.9,1.0 --oracle-profile seed \
      --bench-mps on --output-dir "$OUT/nf4-50"
bench --precision bf16 --max-new-tokens 50 --alphas 0,0.7,1.0 --oracle-profile seed --bench-mps on \
      --target-sm-percent 60 --no-hf-generate --output-dir "$OUT/bf16-50-sm60"
"$PY" -m coordinator bench --input "$IN" --synthetic-weights 7b --samples 3 --warmup 1 --precision fp32 \
      --max-new-tokens 50 --alphas 0.5,1 --oracle-profile seed --bench-mps on --no-hf-generate \
      --output-dir "$OUT/fp32-50"
