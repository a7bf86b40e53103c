"""JPEG decoding on the training device: loader workers only draw the crops.

With ``--decode gpu`` the loader workers read the shards and draw both views' crops and flips
(the same draws, from the same per-batch seed, as :meth:`~ladder_siam.data.crops.TwoViewCrop.
from_jpeg` on the CPU), but decode nothing: a batch is the JPEG bytes plus the crops. The
training process decodes the whole batch at once with ``torchvision.io.decode_jpeg`` (nvjpeg
on CUDA; libjpeg on the CPU, which is how the tests run it) and resizes the crops there. That
takes decoding and resizing, over 90 % of a loader worker's time per image, off the CPU
cores, for machines whose cores cannot feed the GPU. (torchvision 0.29 deprecates its image
codecs in favour of TorchCodec's; ``decode_jpeg`` still works.)

The crops are resized with ``F.interpolate(antialias=True)``, torch's port of Pillow's
resampling, which is also what the CPU path runs (its uint8 kernel): the same filter, so the
two paths agree within rounding. ``roi_align`` would batch the crops, but it averages a fixed
grid of bilinear samples instead of applying the bicubic filter, which changes edges by
several grey levels. Decoded full size, an image of several megapixels costs the device more
than its draft-decoded crop costs the CPU path, and views of such images differ a little more
(DCT scaling there, the antialiased filter here).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from ladder_siam.data.crops import TwoViewCrop, ViewCrop
from ladder_siam.data.shards import jpeg_size
from ladder_siam.data.tar_shards import Sample

# The fields of one view's row in JpegBatch.views.
TOP, LEFT, HEIGHT, WIDTH, FLIP = range(5)


class JpegBatch(NamedTuple):
    """A batch of undecoded images and their two views' crops (a tuple, so pinnable).

    Attributes:
        data: uint8 ``[total bytes]``, the JPEG files back to back.
        lengths: int64 ``[B]``, the size of each file in bytes.
        views: int64 ``[B, 2, 5]``, per view ``(top, left, height, width, flip)`` in pixels
            of the full-size image.
    """

    data: Tensor
    lengths: Tensor
    views: Tensor


class JpegTwoViews:
    """Loader transform for ``ShardDataset(decode=False)``: the JPEG bytes and two crops.

    Reads only the JPEG header, for the image size the crops are drawn from.

    Args:
        crop: Supplies the output size, the crop ranges and the random draws.
    """

    def __init__(self, crop: TwoViewCrop) -> None:
        self.crop = crop

    def __call__(self, sample: Sample) -> tuple[bytes, tuple[ViewCrop, ViewCrop]]:
        """Returns the sample's JPEG bytes and its two views' crops."""
        jpeg: bytes = sample["jpg"]  # type: ignore[assignment]
        width, height = jpeg_size(jpeg)
        return jpeg, (self.crop.sample(width, height), self.crop.sample(width, height))


def collate_jpegs(items: list[tuple[bytes, tuple[ViewCrop, ViewCrop]]]) -> JpegBatch:
    """Packs transformed samples into one :class:`JpegBatch`.

    The bytes go into one tensor: a list of tensors would cross the worker boundary as one
    shared-memory file each.
    """
    data = torch.frombuffer(bytearray().join(jpeg for jpeg, _ in items), dtype=torch.uint8)
    lengths = torch.tensor([len(jpeg) for jpeg, _ in items], dtype=torch.int64)
    views = torch.tensor(
        [[[v.top, v.left, v.height, v.width, v.flip] for v in pair] for _, pair in items],
        dtype=torch.int64,
    )
    return JpegBatch(data, lengths, views)


def resize_crop(image: Tensor, view: list[int], size: int, mode: str) -> Tensor:
    """One view of a decoded uint8 ``[3, H, W]`` image: float ``[3, size, size]``, unflipped.

    Resizes width, then height, rounding and clamping in between as Pillow and torch's uint8
    kernel do: in one float pass, bicubic overshoot at sharp edges would survive to the output.
    CUDA has no antialiased uint8 resize, hence float.
    """
    top, left, height, width = view[TOP], view[LEFT], view[HEIGHT], view[WIDTH]
    crop = image[None, :, top : top + height, left : left + width].float()
    rows = F.interpolate(crop, size=(height, size), mode=mode, antialias=True, align_corners=False)
    rows = rows.round_().clamp_(0, 255)
    return F.interpolate(rows, size=(size, size), mode=mode, antialias=True, align_corners=False)[0]


def decode_views(
    batch: JpegBatch, size: int, device: torch.device, mode: str = "bicubic"
) -> tuple[Tensor, Tensor]:
    """Decodes a :class:`JpegBatch` on ``device`` into the two views, as the CPU path would.

    Args:
        batch: From :func:`collate_jpegs` (on the CPU, ideally pinned).
        size: Side of the square views (the crop's ``size``).
        device: Where to decode and resize; nvjpeg decodes the whole batch in one call.
        mode: ``"bicubic"`` or ``"bilinear"`` (the crop's ``mode``).

    Returns:
        Two uint8 ``[B, 3, size, size]`` tensors on ``device``.
    """
    jpegs = list(batch.data.split(batch.lengths.tolist()))
    images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    crops = batch.views.tolist()
    views = torch.stack(
        [
            torch.stack([resize_crop(image, view, size, mode) for view in pair])
            for image, pair in zip(images, crops, strict=True)
        ],
        dim=1,
    )
    flip = batch.views[..., FLIP].T.bool().to(device, non_blocking=True)
    views = torch.where(flip[..., None, None, None], views.flip(-1), views)
    views = views.round_().clamp_(0, 255).to(torch.uint8)
    return views[0], views[1]
