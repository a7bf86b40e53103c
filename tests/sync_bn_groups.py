"""Run under torchrun: prints, as JSON, which ranks each SyncBatchNorm layer of this rank's
model synchronises with (``tests/test_pretrain.py`` reads it)."""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from ladder_siam.pretrain.config import PretrainConfig
from ladder_siam.pretrain.train import build_model
from ladder_siam.runtime import distributed
from ladder_siam.runtime.loop import convert_sync_bn

if __name__ == "__main__":
    env = distributed.setup()
    config = PretrainConfig(
        shards="-", out="-", arch="resnet18", small_input=True, hidden_dim=64, projection_dim=32
    )
    model = build_model(config, env)
    # SyncBatchNorm runs on GPUs only, but converting only swaps modules: a CUDA env on CPU
    # shows which ranks each layer would share its statistics with.
    model = convert_sync_bn(
        model, dataclasses.replace(env, device=torch.device("cuda")), sys.argv[1]
    )
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    groups = sorted(
        {
            tuple(dist.get_process_group_ranks(m.process_group or dist.group.WORLD))
            for m in norms
            if isinstance(m, nn.SyncBatchNorm)
        }
    )
    synced = sum(isinstance(m, nn.SyncBatchNorm) for m in norms)
    report = {"rank": env.rank, "groups": groups, "synced": synced, "norms": len(norms)}
    # One write per line: the node's two processes share torchrun's stdout.
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    distributed.cleanup()
