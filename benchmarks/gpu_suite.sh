#!/usr/bin/env bash
# One prepared run of the GPU benchmarks, for a lent GPU machine (torch preinstalled; the
# package runs from src/ without installation). Results land in $OUT (or ./gpu_results).
#
#   bash benchmarks/gpu_suite.sh [PART ...]     default: e2e e2e-gpu-decode fmnist compiled
#
# Parts, in the order a short lease should spend its minutes (each compile of ResNet-50 takes
# about 165 s on an H100, so the compiled parts come last):
#   e2e             issue 6: pretraining from 400 px JPEG shards against the synthetic step,
#                   bf16 + channels_last eager (ceiling and end to end, ~3 min with rendering)
#   e2e-gpu-decode  the same with nvjpeg decoding on the GPU (--decode gpu)
#   fmnist          issue 6: BYOL vs Ladder-BYOL on the 60k Fashion-MNIST images, eager bf16
#   compiled        issue 3's open numbers: compiled BYOL and Ladder-DenseBYOL steps, then
#                   the compiled end to end
#   eager-steps     the four methods' eager steps (issue 3's ratios; measured 2026-11-26)
#   monitor         issue 14: the online monitor's cost on the ResNet-50 bf16 eager step,
#                   BYOL and Ladder-BYOL, 100 steps holding one RankMe (about 2 min)
#
# Demo shards need pycocotools, which the GPU image lacks (it has prometheus-client, pyyaml,
# tqdm). Fetch its wheel once into .whl/ (git-ignored) and name .whl in the run's carry:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pycocotools
# The fmnist part reads Fashion-MNIST's IDX files (30 MB) from .fmnist/ (git-ignored; carry it):
#   mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/
# A run: carry [".whl", ".fmnist"], command `OUT=$OUT bash benchmarks/gpu_suite.sh e2e fmnist`.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'; } | tee "$out/machine.txt"

step() { python3 benchmarks/bench_step.py --out "$out/bench_step.jsonl" "$@" 2>&1 | tee -a "$out/bench_step.log"; }
e2e() { python3 benchmarks/bench_e2e.py --out "$out" --data /tmp/e2e "$@" 2>&1 | tee -a "$out/bench_e2e.log"; }
gpu_decode=(--pretrain-arg=--decode --pretrain-arg=gpu)

for part in "${@:-e2e e2e-gpu-decode fmnist compiled}"; do
  for part in $part; do
    echo "== $part $(date +%T)" | tee -a "$out/parts.log"
    case "$part" in
      e2e) e2e --variant bf16-cl ;;
      e2e-gpu-decode) e2e --variant bf16-cl "${gpu_decode[@]}" ;;
      fmnist)
        python3 benchmarks/reproduce_fashion_mnist.py --out /tmp/fmnist-gpu --workers 12 \
          --fashion-mnist-dir "${FASHION_MNIST_DIR:-.fmnist}" \
          --pretrain-arg=--compile --pretrain-arg=false 2>&1 | tee "$out/fmnist.log"
        cp /tmp/fmnist-gpu/summary.json "$out/fmnist_summary.json" ;;
      compiled)
        step --variants bf16-cl-compiled --methods byol,ladder-dense-byol --steps 15 --warmup 3
        e2e --variant bf16-cl-compiled ;;
      eager-steps) step --variants bf16-cl --steps 15 --warmup 5 ;;
      monitor)
        step --monitor --methods byol,ladder-byol --variants bf16-cl --steps 100 \
          --rank-every 100 --warmup 5 ;;
      *) echo "unknown part $part" >&2 ;;
    esac
  done
done
