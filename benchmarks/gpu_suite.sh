#!/usr/bin/env bash
# One prepared run of the GPU benchmarks, for a lent GPU machine (torch preinstalled; the
# package runs from src/ without installation). Results land in $OUT (or ./gpu_results).
# Cheapest and most important first, so a run cut short still returns the key numbers.
# The end-to-end benchmark renders demo shards, which needs pycocotools; the GPU image has
# the rest (prometheus-client, pyyaml, tqdm). Fetch its wheel once into .whl/ (git-ignored)
# and name .whl in the run's carry:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pycocotools
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'; } | tee "$out/machine.txt"
step() { python3 benchmarks/bench_step.py --out "$out/bench_step.jsonl" "$@" 2>&1 | tee -a "$out/bench_step.log"; }
# 1. eager bf16 + channels_last, all four methods (the ratios), ResNet-50 at 224 px, batch 256
step --variants bf16-cl --steps 15 --warmup 5
# 2. compiled: the floor (Ladder-BYOL >= 2000 img/s) and its ratio to BYOL, then the dense one
step --variants bf16-cl-compiled --methods ladder-byol,byol,ladder-dense-byol --steps 15 --warmup 3
# 3. end to end from 400 px JPEG shards against that ceiling, all cores feeding one GPU; then
# with nvjpeg decoding on the GPU (issue 6)
e2e() { python3 benchmarks/bench_e2e.py --out "$out" --data /tmp/e2e "$@" 2>&1 | tee -a "$out/bench_e2e.log"; }
e2e --variant bf16-cl-compiled
e2e --variant bf16-cl-compiled --pretrain-arg=--decode --pretrain-arg=gpu
