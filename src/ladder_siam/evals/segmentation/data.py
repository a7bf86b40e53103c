"""Image and mask transforms of the segmentation finetune, after mmsegmentation's pipelines.

Training (mmseg's VOC/Cityscapes pipeline): a keep-ratio resize to the preset's scale times a
random ratio in 0.5-2.0, a random crop that avoids crops dominated by one class
(``cat_max_ratio``), a horizontal flip, and padding to the crop size. mmseg's
``PhotoMetricDistortion`` (colour jitter) is not applied: a simplification of its pipeline
that keeps the transforms geometric and cheap in the loader workers; its effect on mIoU is not
measured here. Evaluation: the same keep-ratio resize without randomness; the mask keeps its
original size, because predictions are scored at the original resolution.

Masks are resized with nearest neighbour only (class indices must never blend) and returned
as int64 class maps; the image stays uint8 until :func:`normalize_images` puts it on the
device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ladder_siam.data.manifest import IGNORE_LABEL
from ladder_siam.data.photometric import IMAGENET_MEAN, IMAGENET_STD, normalize
from ladder_siam.data.shards import DecodedSample

# Pixels padded into a crop take the mean colour, which normalisation maps to 0: what mmseg's
# padding after normalisation produces.
PAD_COLOR = tuple(round(255 * channel) for channel in IMAGENET_MEAN)
# mmseg's RandomCrop redraws a crop at most this many times to satisfy cat_max_ratio.
CROP_TRIES = 10


def keep_ratio_factor(width: int, height: int, scale: Sequence[int]) -> float:
    """The largest factor that fits an image's (long, short) sides in ``scale`` (mmseg's rule)."""
    long_side, short_side = max(scale), min(scale)
    return min(long_side / max(width, height), short_side / min(width, height))


def _resize(image: Image.Image, factor: float, resample: Image.Resampling) -> Image.Image:
    size = (max(1, int(image.width * factor + 0.5)), max(1, int(image.height * factor + 0.5)))
    return image if size == image.size else image.resize(size, resample)


def _mask_of(sample: DecodedSample) -> Image.Image:
    if sample.mask is None:
        raise ValueError(f"sample {sample.key}: no segmentation mask (expected voc-layout shards)")
    return sample.mask


def _to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # np.array copies: PIL's arrays are read-only and crops or flips may be views of them.
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return pixels, torch.from_numpy(np.array(mask, dtype=np.int64))


class SegmentationTrainTransform:
    """Random scale, crop, flip and pad of an image and its mask, kept aligned.

    Randomness comes from torch's global generator, which the training loader seeds per batch,
    so a resumed run sees the same crops.

    Args:
        crop_size: Side of the square training crop in pixels.
        scale: (long, short) bound of the keep-ratio resize before the random ratio (mmseg's
            ``scale``: (2048, 512) for VOC, (2048, 1024) for Cityscapes).
        ratio_range: Range of the random resize ratio.
        cat_max_ratio: Redraw a crop (up to 10 times) whose most frequent labelled class
            covers this fraction of its labelled pixels or more; 1 disables it.
    """

    def __init__(
        self,
        crop_size: int,
        scale: Sequence[int],
        ratio_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
    ) -> None:
        self.crop_size = crop_size
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)
        self.cat_max_ratio = cat_max_ratio

    def __call__(self, sample: DecodedSample) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the uint8 ``[3, crop, crop]`` image and int64 ``[crop, crop]`` mask."""
        mask_image = _mask_of(sample)
        low, high = self.ratio_range
        ratio = low + (high - low) * float(torch.rand(()))
        factor = ratio * keep_ratio_factor(*sample.image.size, self.scale)
        image = np.asarray(_resize(sample.image, factor, Image.Resampling.BILINEAR))
        mask = np.asarray(_resize(mask_image, factor, Image.Resampling.NEAREST))
        top, left = self._crop_origin(mask)
        image = image[top : top + self.crop_size, left : left + self.crop_size]
        mask = mask[top : top + self.crop_size, left : left + self.crop_size]
        if float(torch.rand(())) < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return _to_tensors(*self._pad(image, mask))

    def _crop_origin(self, mask: np.ndarray) -> tuple[int, int]:
        height, width = mask.shape
        origin = (0, 0)
        for _ in range(CROP_TRIES):
            origin = (
                int(torch.randint(max(height - self.crop_size, 0) + 1, ())),
                int(torch.randint(max(width - self.crop_size, 0) + 1, ())),
            )
            if self.cat_max_ratio >= 1:
                break
            top, left = origin
            crop = mask[top : top + self.crop_size, left : left + self.crop_size]
            counts = np.bincount(crop.ravel(), minlength=IGNORE_LABEL + 1)[:IGNORE_LABEL]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return origin

    def _pad(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        height, width = mask.shape
        if height == width == self.crop_size:
            return image, mask
        padded_image = np.empty((self.crop_size, self.crop_size, 3), dtype=np.uint8)
        padded_image[...] = PAD_COLOR
        padded_mask = np.full((self.crop_size, self.crop_size), IGNORE_LABEL, dtype=np.uint8)
        padded_image[:height, :width] = image
        padded_mask[:height, :width] = mask
        return padded_image, padded_mask


class SegmentationEvalTransform:
    """The keep-ratio resize of the test pipeline; the mask stays at the original size.

    Args:
        scale: (long, short) bound of the resize, as in training.
    """

    def __init__(self, scale: Sequence[int]) -> None:
        self.scale = tuple(scale)

    def __call__(self, sample: DecodedSample) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the uint8 ``[3, h, w]`` resized image and the int64 ``[H, W]`` mask."""
        mask = np.asarray(_mask_of(sample))
        factor = keep_ratio_factor(*sample.image.size, self.scale)
        image = np.asarray(_resize(sample.image, factor, Image.Resampling.BILINEAR))
        return _to_tensors(image, mask)


def normalize_images(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Moves a uint8 ``[N, 3, H, W]`` batch to ``device`` as ImageNet-normalised floats.

    The normalisation of pretraining (``augment.IMAGENET_MEAN``/``STD``), so the backbone
    sees inputs distributed as it learned them.
    """
    pixels = batch.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device)
    return normalize(pixels, mean, torch.tensor(IMAGENET_STD, device=device))
