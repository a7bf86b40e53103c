"""Mask R-CNN inputs from COCO-layout shards: image tensors, instance targets, flips.

torchvision's detection models take a list of variable-sized ``[3, H, W]`` float images in
[0, 1] and, for training, one target dict per image; resizing and normalisation happen inside
the model (``GeneralizedRCNNTransform``). So the loader's transforms here only decode: the
instance masks from their COCO RLE, the boxes from COCO's ``[x, y, w, h]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from ladder_siam.data.shards import DecodedSample

Target = dict[str, torch.Tensor]


def image_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float ``[3, H, W]`` tensor in [0, 1]."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    return pixels.permute(2, 0, 1).float().div_(255)


def instances_of(sample: DecodedSample) -> dict[str, Any]:
    """The COCO record of a sample (image id, size, instances).

    Raises:
        ValueError: The sample has no instance annotations (not a COCO-layout shard).
    """
    if sample.instances is None:
        raise ValueError(f"sample {sample.key}: no instance annotations (not COCO-layout shards)")
    return sample.instances


def instance_targets(record: Mapping[str, Any], height: int, width: int) -> Target:
    """The training target of one image in torchvision's detection format.

    Crowd regions are left out: Mask R-CNN trains on single objects, and detectron2 drops
    ``iscrowd`` annotations from training targets too (they still count in evaluation).
    Degenerate boxes are dropped as well, since torchvision rejects them. An instance without
    a segmentation gets its box as its mask.

    Returns:
        ``boxes`` float ``[N, 4]`` (x1, y1, x2, y2), ``labels`` int64 ``[N]`` (category + 1;
        0 is the background) and ``masks`` uint8 ``[N, H, W]``; N may be 0.
    """
    kept = [
        instance
        for instance in record["instances"]
        if not instance.get("iscrowd", 0) and instance["bbox"][2] > 0 and instance["bbox"][3] > 0
    ]
    boxes = torch.tensor(
        [[x, y, x + w, y + h] for x, y, w, h in (i["bbox"] for i in kept)], dtype=torch.float32
    ).reshape(-1, 4)
    labels = torch.tensor([int(i["category"]) + 1 for i in kept], dtype=torch.int64)
    masks = torch.zeros((len(kept), height, width), dtype=torch.uint8)
    for index, instance in enumerate(kept):
        segmentation = instance.get("segmentation")
        if segmentation is None:
            x1, y1, x2, y2 = boxes[index].round().int().tolist()
            masks[index, y1:y2, x1:x2] = 1
        else:
            masks[index] = torch.from_numpy(mask_utils.decode(segmentation))
    return {"boxes": boxes, "labels": labels, "masks": masks}


def horizontal_flip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Mirrors an image and its target: pixel column c goes to W - 1 - c, box x to W - x."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


class TrainTransform:
    """A training sample: (image, target) with a random horizontal flip.

    The flip is the only augmentation of the 1x recipe (detectron2's and mmdetection's
    Mask R-CNN configs). It draws from torch's global RNG, which the loader seeds per batch,
    so a resumed run flips exactly the images an uninterrupted one would have.

    Args:
        flip_prob: Probability of flipping an image.
    """

    def __init__(self, flip_prob: float = 0.5) -> None:
        self.flip_prob = flip_prob

    def __call__(self, sample: DecodedSample) -> tuple[torch.Tensor, Target]:
        """Decodes the image and its instances, flipped with probability ``flip_prob``."""
        image = image_tensor(sample.image)
        target = instance_targets(instances_of(sample), image.shape[1], image.shape[2])
        if torch.rand(()).item() < self.flip_prob:
            image, target = horizontal_flip(image, target)
        return image, target


def eval_transform(sample: DecodedSample) -> tuple[torch.Tensor, dict[str, Any]]:
    """An evaluation sample: the image and its COCO record (the ground truth, kept as is)."""
    return image_tensor(sample.image), instances_of(sample)


def collate_lists(batch: Sequence[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """(images, targets) as two lists: detection images differ in size and instance count."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
