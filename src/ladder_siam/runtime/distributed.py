"""Joining the process group that torchrun or a Kubeflow PyTorchJob describes.

torchrun (also inside each PyTorchJob pod) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` for every process it starts; a plain ``python`` run has
none of them and trains as a single process.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ladder_siam.errors import UsageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process stands: its ranks and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and reports."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0 serves the pod's Prometheus metrics."""
        return self.local_rank == 0

    @property
    def local_world_size(self) -> int:
        """Processes on this node (pod): torchrun's ``LOCAL_WORLD_SIZE``."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def setup(timeout_minutes: float = 30.0) -> DistributedEnv:
    """Initialises the process group from the environment (NCCL on GPUs, gloo on CPUs).

    The generous timeout covers a slow first S3 read on one rank while the others wait in
    the first collective.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun's store outlives a restart of its workers (--max-restarts): without a
        # prefix per attempt, restarted ranks would read the dead ranks' addresses.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"attempt-{attempt}/", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
        logger.info("rank %d of %d joined (%s, %s)", rank, world_size, backend, device)
    return DistributedEnv(rank, local_rank, world_size, device)


def batchnorm_group(scope: str) -> dist.ProcessGroup | None:
    """The process group whose ranks share SyncBatchNorm statistics with this rank.

    ``"all"`` (or a single-process run) is every rank: ``None``, PyTorch's default group.
    ``"node"`` is the ranks of this node: torchrun numbers a node's ``LOCAL_WORLD_SIZE``
    processes consecutively, so blocks of that many ranks are the nodes, and their SyncBN
    collectives stay on NVLink. Every rank must call this (groups are created collectively).
    """
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if scope == "all" or world_size == 1:
        return None
    if "LOCAL_WORLD_SIZE" not in os.environ:
        raise UsageError("--sync-bn-scope node: LOCAL_WORLD_SIZE is not set; launch with torchrun")
    node_size = int(os.environ["LOCAL_WORLD_SIZE"])
    if node_size == world_size:
        return None
    group, _ = dist.new_subgroups(group_size=node_size)
    logger.info("SyncBN statistics shared by ranks %s", dist.get_process_group_ranks(group))
    return group


def cleanup() -> None:
    """Leaves the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()
