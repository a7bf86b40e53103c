"""Reading a split for evaluation: every sample exactly once over all ranks and workers.

``DistributedSampler`` pads the last rank with repeated samples, which biases a metric
computed over 50,000 images by up to ``world_size - 1`` of them. Here each sample belongs to
exactly one (rank, worker) slot, batches may be short, and :func:`gather` joins the ranks'
variable-sized results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from ladder_siam.data.manifest import SplitManifest
from ladder_siam.data.shards import Transform, decode_sample, read_shard
from ladder_siam.data.slots import slot_share
from ladder_siam.data.tar_shards import Sample


class SplitReader(IterableDataset):
    """All samples of a split, each read by exactly one (rank, worker), in manifest order.

    The slots share the samples as ``data.slots.slot_share`` says.

    Args:
        manifest: The split to read.
        batch_size: Samples per batch (the last batch of a slot may be shorter).
        transform: Maps a decoded sample to what a batch is collated from.
        collate: Builds a batch from transformed samples.
        rank: This process's rank; defaults to the initialised process group's.
        world_size: Number of ranks; defaults to the initialised process group's.
        decode_size: Reduced-resolution JPEG decoding (see ``data.decode_sample``).
    """

    def __init__(
        self,
        manifest: SplitManifest,
        batch_size: int,
        transform: Transform,
        collate: Callable[[list[Any]], Any] = default_collate,
        rank: int | None = None,
        world_size: int | None = None,
        decode_size: int | None = None,
    ) -> None:
        super().__init__()
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size or (dist.get_world_size() if distributed else 1)
        self.manifest = manifest
        self.shards = list(
            zip(manifest.shard_uris(), (s.sha256 for s in manifest.shards), strict=True)
        )
        self.repair = manifest.repair_command()
        self.batch_size = batch_size
        self.transform = transform
        self.collate = collate
        self.decode_size = decode_size

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        batch: list[Any] = []
        for sample in self._samples(self.rank * workers + worker, self.world_size * workers):
            batch.append(self.transform(decode_sample(sample, self.decode_size)))
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
        if batch:
            yield self.collate(batch)

    def _samples(self, slot: int, slots: int) -> Iterator[Sample]:
        return slot_share(self.shards, slot, slots, lambda shard: read_shard(*shard, self.repair))


def make_eval_loader(reader: SplitReader, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a :class:`SplitReader` (batches are formed in the workers)."""
    return DataLoader(reader, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates each rank's ``[n_rank, ...]`` tensor along dim 0 on every rank.

    Ranks may hold different numbers of rows (exactly-once reading); rows are padded for the
    collective and the padding dropped afterwards. Without a process group it returns the
    input.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts, strict=True)])
