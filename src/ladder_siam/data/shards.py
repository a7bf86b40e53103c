"""Streaming training batches out of webdataset shards, local or on S3.

Each (rank, loader worker) pair is a *slot*. Per epoch the shard list is shuffled with the
seed and dealt out to the slots; a slot streams its shards straight from storage (nothing is
downloaded first), passes samples through a shuffle buffer, decodes and transforms them and
yields whole batches. Three properties matter for distributed training:

* **Equal length.** An epoch is ``num_samples // (world_size * batch_size)`` batches on every
  rank, whatever the shard sizes. A slot whose shards run out early moves on to shards of the
  next shuffle round, so uneven shards never make one rank wait for another in DDP forever.
* **Determinism.** The order of shards, the shuffle buffer and the random state of each batch's
  transforms depend only on (seed, epoch, slot, batch), so a run resumed at batch ``k`` sees
  exactly the batches an uninterrupted run would have seen.
* **Small datasets.** With fewer shards than slots, every slot reads all shards and keeps
  every ``slots``-th sample, so no slot starves. The partition is ``data.slots.slot_share``,
  which the evaluation reader (``data.splits``) shares.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from ladder_siam.data.manifest import SplitManifest
from ladder_siam.data.slots import slot_share
from ladder_siam.data.tar_shards import Sample, iter_samples
from ladder_siam.errors import UsageError
from ladder_siam.io import storage

logger = logging.getLogger(__name__)

# A slot that got no sample in this many shuffle rounds has a dataset of empty shards.
MAX_EMPTY_ROUNDS = 100
_DRAIN_CHUNK = 1 << 20


@dataclass(frozen=True)
class DecodedSample:
    """A sample after decoding: the RGB image and whatever annotations the layout has."""

    key: str
    image: Image.Image
    label: int | None = None
    instances: dict[str, Any] | None = None
    mask: Image.Image | None = None


Transform = Callable[[DecodedSample], Any] | Callable[[Sample], Any]


def decode_sample(sample: Sample, decode_size: int | None = None) -> DecodedSample:
    """Decodes one raw shard sample.

    Args:
        sample: Raw sample as read from the tar.
        decode_size: When set, JPEGs are decoded at a reduced resolution (libjpeg's DCT
            scaling by 1/2, 1/4 or 1/8) that is still at least this size on both sides: several
            times faster than a full decode for training at a fraction of the stored size. Only
            for samples without pixel annotations, which must stay aligned with the image.
    """
    image = Image.open(io.BytesIO(sample["jpg"]))  # type: ignore[arg-type]
    if decode_size and "json" not in sample and "png" not in sample:
        image.draft("RGB", (decode_size, decode_size))
    image = image.convert("RGB")
    label = int(sample["cls"]) if "cls" in sample else None
    instances = json.loads(sample["json"]) if "json" in sample else None
    mask = Image.open(io.BytesIO(sample["png"])) if "png" in sample else None  # type: ignore[arg-type]
    return DecodedSample(str(sample["__key__"]), image, label, instances, mask)


def jpeg_size(jpeg: bytes) -> tuple[int, int]:
    """``(width, height)`` of a JPEG from its header, without decoding it."""
    return Image.open(io.BytesIO(jpeg)).size


def load_reduced(image: Image.Image, reduction: int) -> torch.Tensor:
    """Decodes an opened JPEG (``Image.open`` read only its header) into uint8 ``[3, H, W]`` RGB.

    Args:
        image: The opened, not yet loaded JPEG.
        reduction: 2, 4 or 8 decodes at that fraction of the size (sides rounded up) with
            libjpeg's DCT scaling, which skips most of the decoding work; 1 at full size.
    """
    if reduction > 1:
        # draft picks the largest power-of-two reduction that keeps at least the given size.
        image.draft("RGB", (image.width // reduction, image.height // reduction))
    return pil_to_tensor(image)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An image as uint8 ``[3, H, W]`` RGB (a view of a channels-last copy of its pixels)."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


class CenterCropResize:
    """Resizes the shorter side to ``size``, centre-crops a square, returns (uint8 CHW, label).

    Args:
        size: Output side length in pixels.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, sample: DecodedSample) -> tuple[torch.Tensor, int]:
        """Returns the cropped image as a uint8 CHW tensor and the label (-1 if none)."""
        image = sample.image
        scale = self.size / min(image.size)
        width, height = (
            max(self.size, round(image.width * scale)),
            max(self.size, round(image.height * scale)),
        )
        image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
        left, top = (width - self.size) // 2, (height - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        return pixels, -1 if sample.label is None else sample.label


class ShardIntegrityError(UsageError):
    """A shard's bytes are not the ones its manifest recorded, or not a readable tar."""


def read_shard(uri: str, sha256: str | None = None, repair: str | None = None) -> Iterator[Sample]:
    """Streams the samples of one shard, verifying its checksum as it goes.

    Args:
        uri: The shard.
        sha256: The manifest's checksum of the shard; checked once the whole shard has
            streamed through (a reader that stops early checks nothing).
        repair: The command that rewrites the shard (``SplitManifest.repair_command``), named
            when the checksum does not match.

    Raises:
        ShardIntegrityError: The tar is corrupt or truncated (the message names the shard
            and the byte), or its sha256 is not the manifest's.
    """
    with storage.open_read(uri) as stream:
        hashing = _HashingReader(stream)
        try:
            yield from iter_samples(hashing)
        except ValueError as error:
            raise ShardIntegrityError(f"{uri}: {error}") from error
        if sha256 is None:
            return
        while hashing.read(_DRAIN_CHUNK):  # the padding after the end-of-archive blocks
            pass
        actual = hashing.digest.hexdigest()
        if actual != sha256:
            remedy = f"`{repair}` writes it again" if repair else "prepare the dataset again"
            raise ShardIntegrityError(
                f"{uri}: sha256 {actual} but the manifest recorded {sha256}: the shard was "
                f"altered or damaged; {remedy}"
            )


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes every byte read through it."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = self._stream.readinto(buffer)  # type: ignore[attr-defined]
        self.digest.update(memoryview(buffer)[:count])
        return count


def shuffle_buffer(
    samples: Iterator[Sample], size: int, rng: np.random.Generator
) -> Iterator[Sample]:
    """Approximately shuffles a stream with a buffer of ``size`` samples (webdataset style)."""
    buffer: list[Sample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = int(rng.integers(len(buffer)))
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)  # type: ignore[arg-type]
    yield from buffer


class ShardDataset(IterableDataset):
    """An epoch of equal-length, deterministic batches for one rank; see the module docstring.

    Use with :func:`make_loader` (or a ``DataLoader`` with ``batch_size=None``): batching
    happens in the workers, so whole batches cross the process boundary.

    Args:
        manifest: The split to read.
        batch_size: Samples per batch on this rank.
        transform: Maps a :class:`DecodedSample` to what a batch is collated from.
        rank: This process's rank; defaults to the initialised process group's.
        world_size: Number of ranks; defaults to the initialised process group's.
        seed: Seed of the shard order, shuffle buffer and transforms.
        shuffle: Shuffle shards and samples (training); off reads in manifest order.
        buffer_size: Samples in the shuffle buffer.
        decode_size: Reduced-resolution JPEG decoding target (see :func:`decode_sample`).
        collate: Builds a batch from transformed samples (e.g. a list of detection targets).
        decode: False hands the transform the raw :data:`Sample`, for transforms that decode
            it themselves (at a size chosen per sample) or leave decoding to the GPU.

    Raises:
        ValueError: The split holds fewer samples than one global batch.
    """

    def __init__(
        self,
        manifest: SplitManifest,
        batch_size: int,
        transform: Transform,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        buffer_size: int = 1000,
        decode_size: int | None = None,
        collate: Callable[[list[Any]], Any] = default_collate,
        decode: bool = True,
    ) -> None:
        super().__init__()
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size or (dist.get_world_size() if distributed else 1)
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size}: must be at least 1")
        self.batches_per_epoch = manifest.num_samples // (self.world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise UsageError(
                f"{manifest.location}: {manifest.num_samples} samples are fewer than one "
                f"global batch ({self.world_size} ranks x {batch_size})"
            )
        self.manifest = manifest
        self.shard_uris = manifest.shard_uris()
        self.shard_sha256: list[str | None] = [shard.sha256 for shard in manifest.shards]
        self.repair = manifest.repair_command()
        self.batch_size = batch_size
        self.transform = transform
        self.seed = seed
        self.shuffle = shuffle
        self.buffer_size = buffer_size
        self.decode_size = decode_size
        self.collate = collate
        self.decode = decode
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch to iterate, starting at batch ``start_batch`` (to resume)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start batch {start_batch} outside 0..{self.batches_per_epoch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # The DataLoader takes batches from its workers round-robin starting at worker 0, so
        # worker w plays the role that owns batches b = role (mod W) with the rotation that
        # makes worker 0 produce batch `start_batch`.
        role = (worker + self.start_batch) % workers
        slot, slots = self.rank * workers + role, self.world_size * workers
        my_batches = range(role, self.batches_per_epoch, workers)
        skipped = len(range(role, self.start_batch, workers))
        samples = self._slot_samples(slot, slots)
        for _ in range(skipped * self.batch_size):
            next(samples)
        for batch_index in my_batches[skipped:]:
            # Transforms draw from torch's CPU RNG; seeding it per batch makes resume exact.
            # torch.manual_seed would also seed CUDA's, at a millisecond per call (it records
            # a stack trace for its lazy initialisation): a tenth of a batch of bytes + crops.
            state = np.random.SeedSequence([self.seed, self.epoch, batch_index]).generate_state(1)
            torch.default_generator.manual_seed(int(state[0]))
            yield self.collate([self._transform(next(samples)) for _ in range(self.batch_size)])

    def _transform(self, sample: Sample) -> Any:
        return self.transform(decode_sample(sample, self.decode_size) if self.decode else sample)

    def _slot_samples(self, slot: int, slots: int) -> Iterator[Sample]:
        """The endless stream of raw samples of one slot, shuffle round after round.

        The shuffle buffer is drained at the end of each round, so when a slot's quota fits
        in one round (one rank, or even shards) the epoch reads every sample exactly once.
        """
        empty_rounds = 0
        for round_index in itertools.count():
            samples = self._round_samples(slot, slots, round_index)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch, slot, round_index])
                samples = shuffle_buffer(samples, self.buffer_size, rng)
            yielded = 0
            for sample in samples:
                yielded += 1
                yield sample
            empty_rounds = 0 if yielded else empty_rounds + 1
            if empty_rounds >= MAX_EMPTY_ROUNDS:
                raise RuntimeError(f"{self.manifest.location}: slot {slot} finds no samples")

    def _round_samples(self, slot: int, slots: int, round_index: int) -> Iterator[Sample]:
        """One round: the slot's share of the shards, in this round's shuffled order."""
        count = len(self.shard_uris)
        order: Sequence[int] = range(count)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, round_index])
            order = rng.permutation(count).tolist()
        return slot_share(order, slot, slots, self._read)

    def _read(self, index: int) -> Iterator[Sample]:
        return read_shard(self.shard_uris[index], self.shard_sha256[index], self.repair)


def make_loader(
    dataset: ShardDataset, num_workers: int, pin_memory: bool = False, prefetch_factor: int = 4
) -> DataLoader:
    """A DataLoader over a :class:`ShardDataset` (batches are formed in the workers).

    Workers are not persistent: each epoch starts them anew so they pick up ``set_epoch``.
    """
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
