"""Multi-node scaling estimate: all-reduce volume per step and the expected efficiency.

Counts, from the real models, what data-parallel training sends per optimizer step:

* the gradients DDP all-reduces: every trainable parameter of the online network (backbone,
  projectors, predictors; the EMA target gets none), in fp32;
* the SyncBatchNorm collectives: one small all-reduce per online BN layer and view in the
  forward pass and one in the backward pass (latency-bound, not bandwidth-bound).

Then models a ring all-reduce, ``t = 2 (N - 1) / N * bytes / busbw`` (NCCL's bus bandwidth),
against a single-GPU step time, with and without DDP's overlap of communication and the
backward pass (buckets are reduced while later layers still compute their gradients; only
what does not fit in the backward time, plus the last bucket, is exposed).

``python benchmarks/scaling.py --step-ms 68 --nodes 4 --gpus-per-node 8``
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from ladder_siam.pretrain import build_model
from ladder_siam.pretrain_config import PretrainConfig

# NCCL all-reduce bus bandwidth between nodes (GB/s), by interconnect: one 200 Gb/s HDR NIC
# per node, four, or eight (a DGX A100 as built). Measured busbw is ~80-90% of line rate.
BUS_BANDWIDTH = {"1x HDR": 22.0, "4x HDR": 88.0, "8x HDR": 175.0}
SMALL_ALLREDUCE_S = 40e-6  # one tiny inter-node all-reduce (SyncBN statistics), latency-bound
BACKWARD_SHARE = 0.6  # of the step; the window in which DDP overlaps its all-reduces
BUCKET_MB = 25.0  # DDP's default bucket; the last one cannot overlap


def model_counts(arch: str, method: str) -> tuple[int, int]:
    """(trainable parameters, online BatchNorm layers) of a method's model."""
    config = PretrainConfig(shards="-", out="-", method=method, arch=arch)
    model = build_model(config, torch.device("cpu"))
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    norms = sum(
        1
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight.requires_grad
    )
    return parameters, norms


def step_estimate(
    parameters: int, norms: int, step_s: float, gpus: int, busbw: float
) -> dict[str, float]:
    """Seconds of communication per step and the resulting efficiencies."""
    gradient_bytes = 4 * parameters
    allreduce_s = 2 * (gpus - 1) / gpus * gradient_bytes / (busbw * 1e9)
    # Two views through the online network: a forward and a backward all-reduce per BN layer.
    syncbn_s = 2 * 2 * norms * SMALL_ALLREDUCE_S
    last_bucket_s = 2 * (gpus - 1) / gpus * BUCKET_MB * 1e6 / (busbw * 1e9)
    exposed_s = max(0.0, allreduce_s - BACKWARD_SHARE * step_s) + last_bucket_s + syncbn_s
    return {
        "gradient_mb": gradient_bytes / 1e6,
        "allreduce_ms": 1e3 * allreduce_s,
        "syncbn_ms": 1e3 * syncbn_s,
        "efficiency_no_overlap": step_s / (step_s + allreduce_s + syncbn_s),
        "efficiency_overlap": step_s / (step_s + exposed_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet18,resnet50,resnet101")
    parser.add_argument("--methods", default="byol,ladder-byol,ladder-dense-byol")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument(
        "--step-ms",
        type=float,
        default=68.0,
        help="single-GPU step time at the per-GPU batch (default: the H100's compiled "
        "Ladder-BYOL step at 256 images, 135 ms, halved for 4096 / 32 = 128 per GPU)",
    )
    args = parser.parse_args()
    gpus = args.nodes * args.gpus_per_node
    step_s = args.step_ms / 1e3
    print(f"{args.nodes} x {args.gpus_per_node} GPUs, single-GPU step {args.step_ms:g} ms\n")
    header = "| arch | method | params (M) | fp32 grads (MB) | SyncBN collectives |"
    header += "".join(f" all-reduce ms, {name} |" for name in BUS_BANDWIDTH)
    header += "".join(f" efficiency {name} (overlap / none) |" for name in BUS_BANDWIDTH)
    print(header)
    print("|" + "---|" * (5 + 2 * len(BUS_BANDWIDTH)))
    for arch in args.archs.split(","):
        for method in args.methods.split(","):
            parameters, norms = model_counts(arch, method)
            cells = [arch, method, f"{parameters / 1e6:.1f}"]
            estimates = [
                step_estimate(parameters, norms, step_s, gpus, bw) for bw in BUS_BANDWIDTH.values()
            ]
            cells += [f"{estimates[0]['gradient_mb']:.0f}", str(4 * norms)]
            cells += [f"{e['allreduce_ms']:.1f}" for e in estimates]
            cells += [
                f"{e['efficiency_overlap']:.2f} / {e['efficiency_no_overlap']:.2f}"
                for e in estimates
            ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
