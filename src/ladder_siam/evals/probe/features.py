"""Globally pooled stage features of a frozen ResNet, extracted once per split.

A linear probe and a kNN classifier only ever see a backbone through its pooled features, so
the fast protocol computes them once (evaluation transform, no augmentation) and trains every
classifier on the cache: a 100-epoch probe then costs one backbone pass instead of 100.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from ladder_siam.data.crops import TwoViewCrop
from ladder_siam.data.manifest import SplitManifest
from ladder_siam.data.photometric import IMAGENET_MEAN, IMAGENET_STD, normalize
from ladder_siam.data.shards import DecodedSample
from ladder_siam.data.splits import SplitReader, gather, make_eval_loader
from ladder_siam.nets.archs import STAGES
from ladder_siam.runtime.progress import Progress

logger = logging.getLogger(__name__)


class EvalTransform:
    """Resizes the shorter side to ``resize``, centre-crops ``size``: (uint8 CHW, label).

    mmselfsup's (and torchvision's) ImageNet evaluation pipeline: 256 then 224, bilinear.

    Args:
        size: Side of the square crop in pixels.
        resize: Shorter side before cropping, at least ``size``.
    """

    def __init__(self, size: int, resize: int) -> None:
        if resize < size:
            raise ValueError(f"resize {resize} is smaller than the crop {size}")
        self.size = size
        self.resize = resize

    def __call__(self, sample: DecodedSample) -> tuple[torch.Tensor, int]:
        """Returns the crop as a uint8 ``[3, size, size]`` tensor and the label (-1 if none)."""
        image = sample.image
        scale = self.resize / min(image.size)
        width = max(self.resize, round(image.width * scale))
        height = max(self.resize, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
        left, top = (width - self.size) // 2, (height - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        return pixels, -1 if sample.label is None else sample.label


class RandomCropFlip:
    """The standard protocol's training view and label: (uint8 CHW, label).

    A random resized crop (8-100 % of the area) flipped half the time, bilinear, as in
    mmselfsup's linear-evaluation pipeline.

    Args:
        size: Side of the square crop in pixels.
    """

    def __init__(self, size: int) -> None:
        self.crop = TwoViewCrop(size, interpolation=Image.Resampling.BILINEAR)

    def __call__(self, sample: DecodedSample) -> tuple[torch.Tensor, int]:
        """Returns one random view and the label (-1 if none)."""
        image = sample.image if sample.image.mode == "RGB" else sample.image.convert("RGB")
        return self.crop.crop(image), -1 if sample.label is None else sample.label


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float on ``device``, ImageNet-normalised (as in pretraining)."""
    pixels = images.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device)
    std = torch.tensor(IMAGENET_STD, device=device)
    return normalize(pixels, mean, std)


class PooledStages(nn.Module):
    """A frozen torchvision ResNet that returns the global average of the requested stages.

    Only the layers up to the deepest requested stage run (res2 alone costs a fraction of a
    full forward). The wrapped modules are the ResNet's own, so its weights are shared.

    Args:
        resnet: A torchvision ResNet (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1..4``).
        stages: Stages to return, among ``res2..res5`` (= ``layer1..layer4``).
    """

    def __init__(self, resnet: nn.Module, stages: Sequence[str]) -> None:
        super().__init__()
        self.stages = tuple(sorted(stages, key=STAGES.index))
        depth = STAGES.index(self.stages[-1]) + 1
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layers = nn.ModuleList(getattr(resnet, f"layer{i + 1}") for i in range(depth))
        expansion = resnet.fc.in_features // 512
        self.channels = {stage: 64 * 2 ** STAGES.index(stage) * expansion for stage in self.stages}
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PooledStages:
        """Stays in eval mode, whatever ``mode``.

        A frozen backbone keeps its BatchNorm statistics (mmselfsup's ``norm_eval``), also
        while the classifiers on top of it train.
        """
        return super().train(False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns ``{stage: [B, channels]}`` for the requested stages."""
        x = self.stem(images)
        pooled = {}
        for stage, layer in zip(STAGES, self.layers, strict=False):
            x = layer(x)
            if stage in self.stages:
                pooled[stage] = x.mean(dim=(2, 3))
        return pooled


@dataclass
class FeatureSet:
    """The pooled features and labels of a whole split (every sample exactly once)."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@torch.no_grad()
def extract_features(
    model: PooledStages,
    manifest: SplitManifest,
    transform: EvalTransform,
    batch_size: int,
    workers: int,
    device: torch.device,
    rank: int | None = None,
    world_size: int | None = None,
    report: bool = True,
) -> FeatureSet:
    """Runs ``model`` once over a split; every rank returns all samples' features.

    Each rank reads its exactly-once share (:class:`SplitReader`) and the shares are joined
    with :func:`gather`, so no sample is dropped or counted twice, whatever the world size.

    Args:
        model: The frozen backbone, on ``device``.
        manifest: The split to read.
        transform: The evaluation transform.
        batch_size: Images per forward pass.
        workers: Loader processes.
        device: Where the backbone runs.
        rank: This rank (default: the process group's).
        world_size: Ranks (default: the process group's).
        report: Whether this rank reports progress.

    Returns:
        Features (float32, on ``device``) and labels, ordered by rank, then by reading order.
    """
    reader = SplitReader(
        manifest, batch_size, transform, rank=rank, world_size=world_size,
        decode_size=transform.resize,
    )  # fmt: skip
    parts: dict[str, list[torch.Tensor]] = {stage: [] for stage in model.stages}
    labels: list[torch.Tensor] = []
    with Progress(
        manifest.num_samples, f"features {manifest.split}", "img", logger, enabled=report
    ) as progress:
        for images, batch_labels in make_eval_loader(reader, workers, device.type == "cuda"):
            for stage, pooled in model(to_model_input(images, device)).items():
                parts[stage].append(pooled.float())
            labels.append(batch_labels.to(device))
            # Ranks read near-equal shares; rank 0's count times the ranks is the total's pace.
            progress.update(len(batch_labels) * reader.world_size)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    features = {
        stage: gather(
            torch.cat(chunks) if chunks else torch.zeros(0, model.channels[stage], device=device)
        )
        for stage, chunks in parts.items()
    }
    return FeatureSet(features, gather(torch.cat(labels) if labels else empty))
