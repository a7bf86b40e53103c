"""BYOL's random resized crops and flips, drawn in the loader workers.

Both views of an image get a random resized crop (8-100 % of the area, aspect ratio
3/4-4/3, bicubic) and a horizontal flip with probability 0.5 (Grill et al. 2020, appendix B).
:class:`TwoViewCrop` draws both crops from the JPEG header's size before decoding, decodes at
the smallest reduction (1/2, 1/4, 1/8) that keeps the smaller crop sharp, and returns uint8
tensors, so a batch crosses the process boundary and the PCIe bus at a quarter of float32's
size (or, with :mod:`ladder_siam.data.gpu_decode`, the workers only draw the crops and the
device decodes). The photometric half of the recipe runs batched on the device
(:mod:`ladder_siam.pretrain.augmentation`).

The crops draw from torch's global RNG, which the loader seeds per batch in the workers:
a resumed run gets exactly the crops an uninterrupted one would.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ladder_siam.data.shards import DecodedSample, load_reduced, pil_to_tensor
from ladder_siam.data.tar_shards import Sample

INTERPOLATIONS = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}


def sample_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """Draws a random resized crop exactly as torchvision's ``RandomResizedCrop.get_params``.

    Up to 10 tries of an area fraction uniform in ``scale`` and an aspect ratio log-uniform in
    ``ratio``; if none fits in the image, the largest centred crop within ``ratio``. The same
    torch RNG calls in the same order, so a seed gives torchvision's box.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        scale: Range of the crop's area as a fraction of the image's.
        ratio: Range of the crop's width / height.

    Returns:
        ``(top, left, crop_height, crop_width)`` in pixels.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        crop_width = round(math.sqrt(target_area * aspect_ratio))
        crop_height = round(math.sqrt(target_area / aspect_ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(torch.randint(0, height - crop_height + 1, size=(1,)).item())
            left = int(torch.randint(0, width - crop_width + 1, size=(1,)).item())
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_width, crop_height = round(height * max(ratio)), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


@dataclass(frozen=True)
class ViewCrop:
    """One view's random resized crop, in pixels of the full-size image, and its flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def draft_factor(views: tuple[ViewCrop, ...], size: int, reducing_gap: float | None) -> int:
    """The JPEG DCT scaling (1, 2, 4 or 8) that keeps every view's crop well resolved.

    The views share one decode, so the smallest crop decides: reduced, its shorter side must
    still be ``reducing_gap`` times ``size`` (Pillow's ``thumbnail`` rule).
    """
    if reducing_gap is None:
        return 1
    shortest = min(min(view.height, view.width) for view in views)
    return next((f for f in (8, 4, 2) if shortest >= f * reducing_gap * size), 1)


def resized_crop(
    pixels: Tensor, view: ViewCrop, size: int, mode: str, scale: float = 1.0
) -> Tensor:
    """Crops ``view`` out of uint8 ``[3, H, W]`` pixels, resizes it to ``size``, flips it.

    ``view`` is in full-size pixels, ``pixels`` is ``scale`` times the full size, ``mode`` is
    bilinear or bicubic, antialiased: torch's uint8 kernel is Pillow's algorithm (same filters,
    fixed-point rounding between the passes) with SIMD, 3-8x faster than Pillow here.
    """
    top, left = round(view.top * scale), round(view.left * scale)
    bottom = max(round((view.top + view.height) * scale), top + 1)
    right = max(round((view.left + view.width) * scale), left + 1)
    crop = pixels[None, :, top:bottom, left:right]
    out = F.interpolate(crop, size=(size, size), mode=mode, antialias=True, align_corners=False)
    return (out.flip(-1) if view.flip else out)[0]


class TwoViewCrop:
    """The CPU half of BYOL's augmentation: two random resized, flipped crops of one image.

    A loader transform for :class:`~ladder_siam.data.shards.ShardDataset` giving, collated, uint8
    ``[B, 3, size, size]`` pairs: call it on decoded samples, or use :meth:`from_jpeg` on raw
    ones (``decode=False``) to decode at the smallest size the two crops allow.

    Args:
        size: Side of the square output in pixels.
        scale: Range of the crop's area as a fraction of the image's.
        ratio: Range of the crop's width / height.
        interpolation: Resampling filter, bilinear or bicubic, antialiased; BYOL resizes with
            bicubic interpolation.
        reducing_gap: :meth:`from_jpeg` decodes at 1/2, 1/4 or 1/8 of the size while every
            crop stays this many times larger than the output (Pillow's recommended 2.0, see
            :func:`draft_factor`); None always decodes at full size.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: Image.Resampling = Image.Resampling.BICUBIC,
        reducing_gap: float | None = 2.0,
    ) -> None:
        if size < 1:
            raise ValueError(f"crop size {size}: must be at least 1")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale {scale}: need 0 < low <= high <= 1")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop ratio {ratio}: need 0 < low <= high")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {interpolation!r}: bilinear or bicubic")
        self.size = size
        self.scale = scale
        self.ratio = ratio
        self.mode = INTERPOLATIONS[interpolation]
        self.reducing_gap = reducing_gap

    def sample(self, width: int, height: int) -> ViewCrop:
        """Draws one view's crop (as torchvision's ``RandomResizedCrop``) and flip."""
        box = sample_crop_box(width, height, self.scale, self.ratio)
        return ViewCrop(*box, flip=torch.rand(1).item() < 0.5)

    def __call__(self, sample: DecodedSample) -> tuple[Tensor, Tensor]:
        """Returns the two views, uint8 ``[3, size, size]`` each, drawn independently."""
        pixels = pil_to_tensor(sample.image)
        return self._view(pixels), self._view(pixels)

    def crop(self, image: Image.Image) -> Tensor:
        """One random resized crop of an image, flipped with probability 0.5."""
        return self._view(pil_to_tensor(image))

    def _view(self, pixels: Tensor) -> Tensor:
        view = self.sample(pixels.shape[-1], pixels.shape[-2])
        return resized_crop(pixels, view, self.size, self.mode)

    def from_jpeg(self, sample: Sample) -> tuple[Tensor, Tensor]:
        """The two views of a raw shard sample, decoding its JPEG at a reduced size if it can.

        The crops are drawn from the header's full size before anything is decoded, so they
        are the ones :class:`~ladder_siam.data.gpu_decode.JpegTwoViews` draws from the same seed.
        """
        image = Image.open(io.BytesIO(sample["jpg"]))  # type: ignore[arg-type]
        width, height = image.size
        views = (self.sample(width, height), self.sample(width, height))
        pixels = load_reduced(image, draft_factor(views, self.size, self.reducing_gap))
        # The exact reduction (decoded sides round up), 1 if the JPEG could not be reduced.
        scale = 1 / round(width / pixels.shape[-1])
        view_a, view_b = (resized_crop(pixels, v, self.size, self.mode, scale) for v in views)
        return view_a, view_b
