#!/usr/bin/env bash
# One prepared run of the GPU benchmarks, for a lent GPU machine (torch preinstalled; the
# package runs from src/ without installation). Results land in $OUT (or ./gpu_results).
# Cheapest and most important first, so a run cut short still returns the key numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'; } | tee "$out/machine.txt"
step() { python3 benchmarks/bench_step.py --out "$out/bench_step.jsonl" "$@" 2>&1 | tee -a "$out/bench_step.log"; }
# 1. eager bf16 + channels_last, all four methods (the ratios), ResNet-50 at 224 px, batch 256
step --variants bf16-cl --steps 15 --warmup 5
# 2. compiled: the floor (Ladder-BYOL >= 2000 img/s) and its ratio to BYOL, then the dense one
step --variants bf16-cl-compiled --methods ladder-byol,byol,ladder-dense-byol --steps 15 --warmup 3
