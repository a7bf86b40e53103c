"""Multi-node scaling estimate: all-reduce volume per step and the expected efficiency.

Counts, from the real models, what data-parallel training sends per optimizer step:

* the gradients DDP all-reduces: every trainable parameter of the online network (backbone,
  projectors, predictors; the EMA target gets none), in fp32;
* the SyncBatchNorm collectives (latency-bound, not bandwidth-bound): per view, one small
  collective per online BN layer in the forward pass and one in the backward pass, and one
  per target BN layer (the target normalises with batch statistics too).

Then models a ring all-reduce, ``t = 2 (N - 1) / N * bytes / busbw`` (NCCL's bus bandwidth),
against a single-GPU step time, with and without DDP's overlap of communication and the
backward pass (buckets are reduced while later layers still compute their gradients; only
what does not fit in the backward time, plus the last bucket, is exposed).

``python benchmarks/scaling.py --step-ms 68 --nodes 4 --gpus-per-node 8 [--sync-bn-scope node]``
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from ladder_siam.pretrain.config import PretrainConfig
from ladder_siam.pretrain.train import build_model
from ladder_siam.runtime.distributed import DistributedEnv

# NCCL all-reduce bus bandwidth between nodes (GB/s), by interconnect: one 200 Gb/s HDR NIC
# per node, four, or eight (a DGX A100 as built). Measured busbw is ~80-90% of line rate.
BUS_BANDWIDTH = {"1x HDR": 22.0, "4x HDR": 88.0, "8x HDR": 175.0}
# One tiny all-reduce (SyncBN statistics), latency-bound: between nodes, or (with
# --sync-bn-scope node) among one node's 8 GPUs over NVLink. Both assumed, not measured.
SMALL_ALLREDUCE_S = {"all": 40e-6, "node": 15e-6}
BACKWARD_SHARE = 0.6  # of the step; the window in which DDP overlaps its all-reduces
BUCKET_MB = 25.0  # DDP's default bucket; the last one cannot overlap


def model_counts(arch: str, method: str) -> tuple[int, int]:
    """(trainable parameters, SyncBN collectives per step) of a method's model.

    Each view goes through the online network (a forward and a backward collective per BN
    layer) and through the target, which also normalises with batch statistics (a forward
    collective per BN layer; it has no backward).
    """
    config = PretrainConfig(shards="-", out="-", method=method, arch=arch)
    model = build_model(config, DistributedEnv(0, 0, 1, torch.device("cpu")))
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    online = sum(1 for norm in norms if norm.weight.requires_grad)
    target = len(norms) - online
    views = 2
    return parameters, views * (2 * online + target)


def step_estimate(
    parameters: int, collectives: int, step_s: float, gpus: int, busbw: float, sync_bn_scope: str
) -> dict[str, float]:
    """Seconds of communication per step and the resulting efficiencies."""
    gradient_bytes = 4 * parameters
    allreduce_s = 2 * (gpus - 1) / gpus * gradient_bytes / (busbw * 1e9)
    syncbn_s = collectives * SMALL_ALLREDUCE_S[sync_bn_scope]
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
    parser.add_argument(
        "--sync-bn-scope",
        choices=tuple(SMALL_ALLREDUCE_S),
        default="all",
        help="the pretrain setting: SyncBN across all GPUs, or within each node",
    )
    args = parser.parse_args()
    gpus = args.nodes * args.gpus_per_node
    step_s = args.step_ms / 1e3
    print(
        f"{args.nodes} x {args.gpus_per_node} GPUs, single-GPU step {args.step_ms:g} ms, "
        f"SyncBN over {args.sync_bn_scope}\n"
    )
    header = "| arch | method | params (M) | fp32 grads (MB) | SyncBN collectives |"
    header += "".join(f" all-reduce ms, {name} |" for name in BUS_BANDWIDTH)
    header += "".join(f" efficiency {name} (overlap / none) |" for name in BUS_BANDWIDTH)
    print(header)
    print("|" + "---|" * (5 + 2 * len(BUS_BANDWIDTH)))
    for arch in args.archs.split(","):
        for method in args.methods.split(","):
            parameters, collectives = model_counts(arch, method)
            cells = [arch, method, f"{parameters / 1e6:.1f}"]
            estimates = [
                step_estimate(parameters, collectives, step_s, gpus, bw, args.sync_bn_scope)
                for bw in BUS_BANDWIDTH.values()
            ]
            cells += [f"{estimates[0]['gradient_mb']:.0f}", str(collectives)]
            cells += [f"{e['allreduce_ms']:.1f}" for e in estimates]
            cells += [
                f"{e['efficiency_overlap']:.2f} / {e['efficiency_no_overlap']:.2f}"
                for e in estimates
            ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
