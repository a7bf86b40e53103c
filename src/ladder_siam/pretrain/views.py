"""The two views of every image: crops in the loader, the rest of BYOL's augmentation on the device.

The loader workers decode, random-resized-crop and flip both views (uint8), or with
``--decode gpu`` only draw the crops and the device decodes them; on the device, the
photometric half of BYOL's augmentation runs batched, seeded per step so that a resumed run
draws the views an uninterrupted one would have drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from ladder_siam.data.crops import TwoViewCrop
from ladder_siam.data.gpu_decode import JpegBatch, JpegTwoViews, collate_jpegs, decode_views
from ladder_siam.data.labeled import CollateWithLabels, WithLabel
from ladder_siam.data.manifest import SplitManifest, load_split
from ladder_siam.data.shards import ShardDataset, Transform
from ladder_siam.pretrain.augmentation import TwoViewPhotometric
from ladder_siam.pretrain.config import PretrainConfig


def build_dataset(
    config: PretrainConfig,
    rank: int,
    world_size: int,
    labels: bool = False,
    manifest: SplitManifest | None = None,
) -> ShardDataset:
    """This rank's training batches of two uint8 views per image.

    With ``decode="gpu"`` a batch is a :class:`~ladder_siam.data.gpu_decode.JpegBatch` instead:
    the images' JPEG bytes and crops, for :func:`views_on_device` to decode. With ``labels``
    a batch is ``(batch, labels)`` (for the online monitor). ``manifest`` is the train split
    if already read.
    """
    manifest = manifest or load_split(config.shards, "train")
    per_rank = config.batch_size // (world_size * config.accumulation)
    crop = TwoViewCrop(config.image_size)
    transform: Transform = crop.from_jpeg
    collate: Callable[[list[Any]], Any] = default_collate
    if config.decode == "gpu":
        transform, collate = JpegTwoViews(crop), collate_jpegs
    if labels:
        transform, collate = WithLabel(transform), CollateWithLabels(collate)
    return ShardDataset(
        manifest, per_rank, transform, rank, world_size, seed=config.seed,
        buffer_size=config.buffer_size, collate=collate, decode=False,
    )  # fmt: skip


def views_on_device(
    batch: tuple[torch.Tensor, torch.Tensor] | JpegBatch, size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch as two uint8 ``[B, 3, size, size]`` views on ``device``."""
    if isinstance(batch, JpegBatch):
        return decode_views(batch, size, device)
    view_a, view_b = batch
    return view_a.to(device, non_blocking=True), view_b.to(device, non_blocking=True)


def build_augment(config: PretrainConfig, device: torch.device) -> nn.Module:
    """The photometric half of BYOL's augmentation, on the training device."""
    augment = TwoViewPhotometric().to(device)
    return torch.compile(augment, dynamic=False) if config.compile else augment


def step_seed(seed: int, step: int, index: int) -> int:
    """The torch seed for the augmentation of micro-batch ``index`` of ``step``.

    Augmentation draws from torch's RNG; seeding it per step and micro-batch makes a resumed
    run draw the views an uninterrupted one would have drawn.
    """
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])


def augmented_views(
    augment: nn.Module,
    batch: Any,
    config: PretrainConfig,
    device: torch.device,
    step: int,
    index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``index`` of ``step`` as two augmented float views on ``device``."""
    torch.manual_seed(step_seed(config.seed, step, index))
    with torch.no_grad():
        view_a, view_b = augment(*views_on_device(batch, config.image_size, device))
    if config.channels_last:
        view_a = view_a.contiguous(memory_format=torch.channels_last)
        view_b = view_b.contiguous(memory_format=torch.channels_last)
    return view_a, view_b
