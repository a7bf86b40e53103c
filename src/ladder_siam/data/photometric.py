"""Batched photometric image ops with one parameter per sample, for augmentation on the GPU.

Each op takes a float batch ``[B, 3, H, W]`` with values in [0, 1] and a ``[B]`` tensor of
parameters, and computes what torchvision's functional op of the same name
(``torchvision.transforms.v2.functional``) computes on one float image with that sample's
parameter. :mod:`ladder_siam.pretrain.augmentation` composes them into BYOL's augmentation.

Everything here is elementwise arithmetic, reductions, ``torch.where`` and grouped
convolutions: nothing synchronises with the host or branches in Python on tensor values, so a
batch stays on its device and ``torch.compile`` traces the whole chain.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The ImageNet statistics every network here is normalised with, in pretraining and evaluation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Colour-jitter op ids, in the order of torchvision's ColorJitter; NO_OP leaves a sample as is.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
NO_OP = -1


def per_sample(values: Tensor) -> Tensor:
    """Views a ``[B]`` tensor as ``[B, 1, 1, 1]`` so that it broadcasts over a batch."""
    return values.view(-1, 1, 1, 1)


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """Luma with torchvision's ITU-R 601-2 weights, ``[B, 1, H, W]``."""
    red, green, blue = images.unbind(dim=1)
    return (red * 0.2989 + green * 0.587 + blue * 0.114).unsqueeze(1)


def blend(images: Tensor, ops: Tensor, factors: Tensor) -> Tensor:
    """Applies brightness, contrast or saturation, whichever each sample's ``ops`` entry names.

    In torchvision the three are one operation, ``_blend``:
    ``clamp(factor * image + (1 - factor) * reference, 0, 1)``, with black as the reference
    for brightness, the image's mean grey level for contrast and its per-pixel grey for
    saturation. So one pass can apply a different one of the three to every sample.

    Args:
        images: ``[B, 3, H, W]`` in [0, 1].
        ops: ``[B]`` op ids (``BRIGHTNESS``, ``CONTRAST`` or ``SATURATION``; ``NO_OP``, or
            any id with factor 1, leaves the sample unchanged).
        factors: ``[B]`` factors of the ops; 1 is the identity.

    Returns:
        The adjusted batch.
    """
    gray = rgb_to_grayscale(images)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    op = per_sample(ops)
    reference = torch.where(op == SATURATION, gray, torch.where(op == CONTRAST, mean, 0.0))
    factor = per_sample(torch.where(ops == NO_OP, 1.0, factors))
    # lerp is the same blend in one kernel instead of three; it returns `images` exactly
    # for a factor of 1.
    return torch.lerp(reference, images, factor).clamp_(0.0, 1.0)


def adjust_brightness(images: Tensor, factors: Tensor) -> Tensor:
    """Scales every sample by its factor, as torchvision's ``adjust_brightness``."""
    return blend(images, torch.full_like(factors, BRIGHTNESS, dtype=torch.long), factors)


def adjust_contrast(images: Tensor, factors: Tensor) -> Tensor:
    """Blends every sample with its mean grey level, as torchvision's ``adjust_contrast``."""
    return blend(images, torch.full_like(factors, CONTRAST, dtype=torch.long), factors)


def adjust_saturation(images: Tensor, factors: Tensor) -> Tensor:
    """Blends every sample with its grey version, as torchvision's ``adjust_saturation``."""
    return blend(images, torch.full_like(factors, SATURATION, dtype=torch.long), factors)


def _rgb_to_hsv(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """RGB to (hue, saturation, value), each ``[B, 1, H, W]`` in [0, 1].

    torchvision's (Pillow's) formulas, batched.
    """
    red, green = images[:, 0:1], images[:, 1:2]
    value = images.amax(dim=1, keepdim=True)
    chroma = value - images.amin(dim=1, keepdim=True)
    # Grey pixels have no hue; dividing by 1 instead of 0 there keeps NaNs out, and their
    # saturation of 0 makes the hue irrelevant.
    achromatic = chroma == 0
    saturation = chroma / torch.where(achromatic, 1.0, value)
    distances = (value - images) / torch.where(achromatic, 1.0, chroma)
    red_c, green_c, blue_c = distances.split(1, dim=1)
    hue = torch.where(
        value == red,
        blue_c - green_c,
        torch.where(value == green, 2.0 + red_c - blue_c, 4.0 + green_c - red_c),
    )
    return (hue / 6.0 + 1.0).fmod(1.0), saturation, value


def _hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """The inverse of :func:`_rgb_to_hsv`, ``[B, 3, H, W]``.

    Uses the closed form ``v - v * s * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6 h) mod 6`` and ``n = 5, 3, 1`` for red, green and blue: the same values as
    torchvision's per-sector lookup table, without gathering through an index tensor.
    """
    # n = 5, 3, 1 made on the device: a host tensor would be a blocking copy on every call.
    n = (5.0 - 2.0 * torch.arange(3, dtype=hue.dtype, device=hue.device)).view(1, 3, 1, 1)
    k = (n + hue * 6.0).remainder(6.0)
    return value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_hue(images: Tensor, shifts: Tensor) -> Tensor:
    """Rotates every sample's hue by its shift (in turns, [-0.5, 0.5]), as torchvision."""
    hue, saturation, value = _rgb_to_hsv(images)
    return _hsv_to_rgb((hue + per_sample(shifts)).remainder(1.0), saturation, value)


def color_jitter(images: Tensor, factors: Tensor, hue_shifts: Tensor, order: Tensor) -> Tensor:
    """Applies all four ColorJitter ops to every sample, each sample in its own order.

    The hue round trip through HSV is the costly op, so it runs once for the whole batch:
    a sample whose hue comes at position ``p`` of its order has ``order[:p]`` as blend ops
    before the hue pass and ``order[p + 1:]`` after it, so three blend passes before and
    three after cover every order. Blend pass ``j`` before the hue applies ``order[j]`` to
    the samples with ``j < p``, pass ``j`` after it ``order[j + 1]`` to those with
    ``j >= p``; the other samples sit the pass out.

    Args:
        images: ``[B, 3, H, W]`` in [0, 1].
        factors: ``[B, 3]`` brightness, contrast and saturation factors.
        hue_shifts: ``[B]`` hue shifts.
        order: ``[B, 4]`` long, each row a permutation of ``(BRIGHTNESS, CONTRAST,
            SATURATION, HUE)``.

    Returns:
        The jittered batch.
    """
    hue_position = (order == HUE).long().argmax(dim=1)
    for before_hue in (True, False):
        for j in range(3):
            active = j < hue_position if before_hue else j >= hue_position
            ops = torch.where(active, order[:, j if before_hue else j + 1], NO_OP)
            # NO_OP is no column of `factors`; its factor is ignored by `blend` anyway.
            op_factors = factors.gather(1, ops.clamp(min=0).unsqueeze(1)).squeeze(1)
            images = blend(images, ops, op_factors)
        if before_hue:
            images = adjust_hue(images, hue_shifts)
    return images


def gaussian_blur(images: Tensor, sigmas: Tensor, kernel_size: int) -> Tensor:
    """Blurs every sample with its own sigma, as torchvision's ``gaussian_blur``.

    The kernel is torchvision's (a softmax over ``-(x / sigma)^2`` at evenly spaced ``x``,
    i.e. a normalised Gaussian at integer offsets), applied separably after reflect padding
    as two grouped 1-D convolutions, one group per (sample, channel), over flattened planes.
    A 2-D depthwise convolution would be as fast in eager mode, but ``torch.compile`` makes
    its input channels-last, which cuDNN runs four times slower (measured on an H100).

    Args:
        images: ``[B, C, H, W]``; both sides must exceed ``kernel_size // 2``.
        sigmas: ``[B]`` standard deviations in pixels, positive.
        kernel_size: Odd kernel side in pixels.

    Returns:
        The blurred batch.
    """
    batch, channels, height, width = images.shape
    limit = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-limit, limit, kernel_size, dtype=images.dtype, device=images.device)
    kernels = (x / sigmas.unsqueeze(1)).pow(2).neg().softmax(dim=1)
    groups = batch * channels
    weights = kernels.repeat_interleave(channels, dim=0).unsqueeze(1)
    pad = kernel_size // 2
    padded = F.pad(images, (pad, pad, pad, pad), "reflect").reshape(1, groups, -1)
    # Rows: each plane is one sequence of its padded rows, zero-extended so that every row
    # yields width + 2 * pad outputs; the first width are its blurred pixels, the rest
    # straddle two rows.
    rows = F.conv1d(F.pad(padded, (0, kernel_size - 1)), weights, groups=groups)
    rows = rows.view(groups, height + 2 * pad, width + 2 * pad)[..., :width].reshape(1, groups, -1)
    # Columns: in a flattened plane vertical neighbours are `width` apart, a dilated kernel.
    planes = F.conv1d(rows, weights, groups=groups, dilation=width)
    return planes.view(batch, channels, height, width)


def solarize(images: Tensor, threshold: float) -> Tensor:
    """Inverts the values at or above ``threshold``, as torchvision's ``solarize``."""
    return torch.where(images >= threshold, 1.0 - images, images)


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Subtracts the per-channel ``mean`` and divides by ``std`` (both ``[3]``)."""
    return (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
