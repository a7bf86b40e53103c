#!/usr/bin/env bash
# One prepared run of the GPU benchmarks, for a lent GPU machine (torch preinstalled; the
# package runs from src/ without installation). Results land in $OUT (or ./gpu_results).
#
#   bash benchmarks/gpu_suite.sh [PART ...]     default: every part but eager-steps, monitor,
#                                               evals
#
# A lease is 15 minutes in all and one command at most 10, so a call runs the parts that fit
# 9 minutes (estimates on an H100/H200): `e2e monitor` (~5 min), `compiled` (~9 min: three
# compiles of ResNet-50 at ~165 s each), `compiled-e2e` (~4 min), `fmnist` (~8 min).
#
# Parts, in the order a short lease should spend its minutes (the compiled parts come last):
#   e2e             issue 6/19: pretraining from 400 px JPEG shards against the synthetic step,
#                   bf16 + channels_last eager (ceiling and end to end, ~3 min with rendering)
#   e2e-gpu-decode  the same with nvjpeg decoding on the GPU (--decode gpu)
#   fmnist          issue 20: BYOL vs Ladder-BYOL on the 60k Fashion-MNIST images, seeds 0-2,
#                   six arms and the control at once on the GPU, eager bf16 (~8 min, estimated)
#   compiled        issue 19: compiled BYOL, Ladder-BYOL and Ladder-DenseBYOL steps (about
#                   165 s of compilation each on an H100): the two step-time ratios
#   compiled-e2e    issue 19: the compiled end to end against its compiled ceiling
#   eager-steps     the four methods' eager steps (issue 3's ratios; measured 2026-11-26)
#   monitor         issue 14/19: the online monitor's cost on the ResNet-50 bf16 eager step,
#                   BYOL and Ladder-BYOL, 100 steps holding one RankMe (about 2 min)
#   evals           the finetune evaluations' training step (bench_eval_step.py): Mask R-CNN
#                   FPN at coco-1x (2 images per GPU, 800x1067) and FCN-D8 at voc (4 crops of
#                   512 px per GPU), the presets' fp32, 5 warm-up + 20 timed steps each; s/iter
#                   x the presets' iterations is a per-GPU-share wall time, without the 8/4-GPU
#                   all-reduce and SyncBN (~3 min on an H100, estimated: mostly model builds)
#
# Demo shards need pycocotools and pretraining writes backbone.safetensors, which the GPU image
# lacks (it has prometheus-client, pyyaml, tqdm). Fetch their wheels once into .whl/
# (git-ignored) and name .whl in the run's carry:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pycocotools safetensors
# The fmnist part reads Fashion-MNIST's IDX files (30 MB) from .fmnist/ (git-ignored; carry it):
#   mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/
# A run: carry [".whl", ".fmnist"], command `OUT=$OUT bash benchmarks/gpu_suite.sh e2e monitor`.
#
# GPU_SUITE_SMOKE=1 runs the same parts on this CPU at toy sizes (ResNet-18 at 32 px, a few
# steps, 600 Fashion-MNIST images for one epoch), so that a typo cannot waste a lease:
#   GPU_SUITE_SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu_suite.sh e2e monitor compiled-e2e fmnist
# Every part's failure is counted and the script exits non-zero if any failed.
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

# The sizes: the issues' on a GPU, toy ones for the CPU smoke run.
model=() e2e_size=() compiled_size=(--steps 15 --warmup 3)
monitor_size=(--steps 100 --rank-every 100 --warmup 5)
evals_size=(--preset-detection coco-1x --preset-segmentation voc --steps 20 --warmup 5)
# Issue 20: BYOL and Ladder-BYOL x seeds 0, 1, 2 and the control, all at once on the one GPU,
# two loader workers each; 8 epochs fit the lease (the arithmetic is in the script's header).
fmnist_arms=(--seeds 0,1,2 --parallel 7)
# The HTML report needs matplotlib and scipy, which a bare GPU image lacks; the summary not.
python3 -c 'import matplotlib, scipy' 2>/dev/null || fmnist_arms+=(--no-report)
fmnist_size=(--workers 2 --epochs "${FMNIST_EPOCHS:-8}") fmnist_out=/tmp/fmnist-gpu
if [[ "${GPU_SUITE_SMOKE:-0}" == 1 ]]; then
  model=(--arch resnet18 --small-input --image-size 32 --batch-size 8 --hidden-dim 64
         --projection-dim 32)
  e2e_size=(--images 64 --size 64 --workers 1 --steps 2 --warmup 2 --log-every 2)
  compiled_size=(--steps 2 --warmup 1)
  monitor_size=(--steps 2 --rank-every 2 --warmup 1 --classes 10)
  evals_size=(--preset-detection tiny --preset-segmentation tiny --steps 2 --warmup 1)
  fmnist_size=(--workers 0 --train-limit 600 --epochs 1 --batch-size 64 --probe-epochs 2
               --analysis-count 8)
  fmnist_out=/tmp/fmnist-smoke
  rm -rf "$fmnist_out"
fi
# No part may eat the lease: each stops after this many seconds (and counts as failed). The
# CPU smoke run is slower than any lease, so it gets an hour.
part_seconds="${GPU_SUITE_PART_SECONDS:-540}"
[[ "${GPU_SUITE_SMOKE:-0}" == 1 ]] && part_seconds="${GPU_SUITE_PART_SECONDS:-3600}"
step() { timeout "$part_seconds" python3 benchmarks/bench_step.py --out "$out/bench_step.jsonl" "${model[@]}" "$@" 2>&1 | tee -a "$out/bench_step.log"; }
# The finetunes' steps at their recipes' per-GPU batches (the benchmark's defaults).
evals() { timeout "$part_seconds" python3 benchmarks/bench_eval_step.py --out "$out/bench_eval_step.jsonl" "${evals_size[@]}" "$@" 2>&1 | tee -a "$out/bench_eval_step.log"; }
e2e() { timeout "$part_seconds" python3 benchmarks/bench_e2e.py --out "$out" --data /tmp/e2e "${model[@]}" "${e2e_size[@]}" "$@" 2>&1 | tee -a "$out/bench_e2e.log"; }
gpu_decode=(--pretrain-arg=--decode --pretrain-arg=gpu)
failed=0

for part in "${@:-e2e e2e-gpu-decode fmnist compiled compiled-e2e}"; do
  for part in $part; do
    echo "== $part $(date +%T)" | tee -a "$out/parts.log"
    case "$part" in
      e2e) e2e --variant bf16-cl ;;
      e2e-gpu-decode) e2e --variant bf16-cl "${gpu_decode[@]}" ;;
      fmnist)
        timeout "$part_seconds" python3 benchmarks/reproduce_fashion_mnist.py \
          --out "$fmnist_out" "${fmnist_arms[@]}" "${fmnist_size[@]}" \
          --fashion-mnist-dir "${FASHION_MNIST_DIR:-.fmnist}" \
          --pretrain-arg=--compile --pretrain-arg=false 2>&1 | tee "$out/fmnist.log" &&
          cp "$fmnist_out/summary.json" "$out/fmnist_summary.json" ;;
      compiled)
        step --variants bf16-cl-compiled --methods byol,ladder-byol,ladder-dense-byol \
          "${compiled_size[@]}" ;;
      compiled-e2e) e2e --variant bf16-cl-compiled ;;
      eager-steps) step --variants bf16-cl --steps 15 --warmup 5 ;;
      evals) evals --task both ;;
      monitor) step --monitor --methods byol,ladder-byol --variants bf16-cl "${monitor_size[@]}" ;;
      *) echo "unknown part $part" >&2; false ;;
    esac
    code=$?
    if ((code)); then
      failed=$((failed + 1))
      echo "== $part failed (exit $code)" | tee -a "$out/parts.log"
    fi
  done
done
echo "== done $(date +%T): $failed part(s) failed" | tee -a "$out/parts.log"
exit $((failed > 0))
