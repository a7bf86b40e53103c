"""BYOL's asymmetric two-view augmentation, split between loader workers and the GPU.

The recipe is BYOL's (Grill et al. 2020, appendix B and Table 6). Both views get a random
resized crop (8-100 % of the area, aspect ratio 3/4-4/3, bicubic) and a horizontal flip with
probability 0.5, colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a
random order per view) with probability 0.8, grayscale with probability 0.2, a Gaussian blur
(sigma in [0.1, 2.0], kernel about a tenth of the side) and solarization; blur and
solarization are asymmetric: probability 1.0 and 0.0 for view A, 0.1 and 0.2 for view B.
The jitter ops are torchvision's ``ColorJitter`` ones (brightness scales the image), as in the
PyTorch reproductions of BYOL; BYOL's own TensorFlow-style code adds a brightness offset.

* :class:`~ladder_siam.data.crops.TwoViewCrop` runs in the loader workers and returns uint8
  tensors, so a batch crosses the process boundary and the PCIe bus at a quarter of float32's
  size (or, with :mod:`ladder_siam.data.gpu_decode`, the workers only draw the crops and the
  device decodes).
* :class:`TwoViewPhotometric` (two :class:`BatchPhotometric`) does the rest on the batch's
  device, with every random parameter drawn per sample in one vectorised call per kind.

Both draw from torch's global RNG: the loader seeds it per batch in the workers, which makes
the crops of a resumed run exact; the photometric draws come from the device's generator in
the training process, which the trainer must seed or restore to resume those exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ladder_siam.data.photometric import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    color_jitter,
    gaussian_blur,
    normalize,
    per_sample,
    rgb_to_grayscale,
    solarize,
)


@dataclass(frozen=True)
class PhotometricConfig:
    """Probabilities and ranges of one view's photometric augmentation.

    Attributes:
        jitter_prob: Probability of colour jitter (all four ops, in a random order).
        brightness: Brightness factors are uniform in ``[max(0, 1 - b), 1 + b]``.
        contrast: Contrast factors likewise.
        saturation: Saturation factors likewise.
        hue: Hue shifts are uniform in ``[-hue, hue]``, in turns of the colour wheel.
        grayscale_prob: Probability of replacing the channels by their luma.
        blur_prob: Probability of a Gaussian blur.
        blur_sigma: Range of the blur's standard deviation in pixels, sampled uniformly.
        blur_kernel_fraction: Kernel side as a fraction of the image side, made odd.
        solarize_prob: Probability of solarization.
        solarize_threshold: Values at or above it are inverted, on the [0, 1] scale.
        mean: Per-channel mean subtracted last.
        std: Per-channel standard deviation divided by last.
    """

    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1
    solarize_prob: float = 0.0
    solarize_threshold: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        probabilities = (self.jitter_prob, self.grayscale_prob, self.blur_prob, self.solarize_prob)
        if not all(0 <= p <= 1 for p in probabilities):
            raise ValueError(f"probabilities {probabilities}: must be in [0, 1]")
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError("jitter strengths must be >= 0, and hue at most 0.5")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur sigma {self.blur_sigma}: need 0 < low <= high")
        if min(self.std) <= 0:
            raise ValueError(f"std {self.std}: must be positive")

    def blur_kernel_size(self, side: int) -> int:
        """The odd blur kernel side for images of ``side`` pixels (23 for 224, as BYOL)."""
        size = max(3, int(self.blur_kernel_fraction * side))
        return size if size % 2 else size + 1


BYOL_VIEW_A = PhotometricConfig(blur_prob=1.0, solarize_prob=0.0)
BYOL_VIEW_B = PhotometricConfig(blur_prob=0.1, solarize_prob=0.2)


@dataclass(frozen=True)
class PhotometricParams:
    """The random parameters of one batch; every field is a tensor with one row per sample.

    Attributes:
        jitter: bool ``[B]``, whether colour jitter applies.
        factors: float ``[B, 3]``, brightness, contrast and saturation factors.
        hue: float ``[B]``, hue shifts.
        order: long ``[B, 4]``, the order of the jitter ops: a permutation of
            ``(BRIGHTNESS, CONTRAST, SATURATION, HUE)`` of :mod:`ladder_siam.data.photometric`.
        grayscale: bool ``[B]``, whether to convert to grey.
        blur: bool ``[B]``, whether to blur.
        sigma: float ``[B]``, the blur's standard deviation in pixels.
        solarize: bool ``[B]``, whether to solarize.
    """

    jitter: Tensor
    factors: Tensor
    hue: Tensor
    order: Tensor
    grayscale: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor


def _uniform(batch: int, low: float, high: float, device: torch.device) -> Tensor:
    return low + (high - low) * torch.rand(batch, device=device)


def _bernoulli(batch: int, probability: float, device: torch.device) -> Tensor:
    # rand is in [0, 1), so probability 0 never and probability 1 always selects.
    return torch.rand(batch, device=device) < probability


def sample_params(config: PhotometricConfig, batch: int, device: torch.device) -> PhotometricParams:
    """Draws every sample's parameters, with one vectorised draw per kind of parameter.

    Parameters are drawn for all samples, also those whose op is not selected, so that the
    draws and the shapes do not depend on the outcome of the Bernoulli draws.
    """
    factors = torch.stack(
        [
            _uniform(batch, max(0.0, 1 - strength), 1 + strength, device)
            for strength in (config.brightness, config.contrast, config.saturation)
        ],
        dim=1,
    )
    return PhotometricParams(
        jitter=_bernoulli(batch, config.jitter_prob, device),
        factors=factors,
        hue=_uniform(batch, -config.hue, config.hue, device),
        # Sorting uniform noise gives uniformly random permutations; BYOL shuffles the
        # order of the jitter ops per view.
        order=torch.rand(batch, 4, device=device).argsort(dim=1),
        grayscale=_bernoulli(batch, config.grayscale_prob, device),
        blur=_bernoulli(batch, config.blur_prob, device),
        sigma=_uniform(batch, *config.blur_sigma, device),
        solarize=_bernoulli(batch, config.solarize_prob, device),
    )


def apply_photometric(
    images: Tensor, params: PhotometricParams, config: PhotometricConfig
) -> Tensor:
    """Applies jitter, grayscale, blur and solarization (in BYOL's order) with given params.

    Each op runs on the whole batch and ``torch.where`` keeps it for the selected samples:
    boolean indexing would make the output shape depend on the draws and cost a host sync.

    Args:
        images: float ``[B, 3, H, W]`` in [0, 1].
        params: Per-sample parameters, e.g. from :func:`sample_params`.
        config: Supplies the blur kernel size and the solarization threshold.

    Returns:
        The augmented batch, still in [0, 1] and not normalised.
    """
    jittered = color_jitter(images, params.factors, params.hue, params.order)
    images = torch.where(per_sample(params.jitter), jittered, images)
    images = torch.where(per_sample(params.grayscale), rgb_to_grayscale(images), images)
    kernel_size = config.blur_kernel_size(min(images.shape[-2:]))
    blurred = gaussian_blur(images, params.sigma, kernel_size)
    images = torch.where(per_sample(params.blur), blurred, images)
    solarized = solarize(images, config.solarize_threshold)
    return torch.where(per_sample(params.solarize), solarized, images)


class BatchPhotometric(nn.Module):
    """The photometric half of one BYOL view, on a uint8 batch on any device.

    Args:
        config: Probabilities and ranges, e.g. :data:`BYOL_VIEW_A`.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, config: PhotometricConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.tensor(config.mean), persistent=False)
        self.register_buffer("std", torch.tensor(config.std), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """Augments and normalises uint8 ``[B, 3, H, W]`` images into float32 ones.

        Raises:
            TypeError: The images are not uint8.
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        pixels = images.float() / 255.0
        params = sample_params(self.config, images.shape[0], images.device)
        augmented = apply_photometric(pixels, params, self.config)
        # A no-op when the module is on the batch's device, as in training.
        return normalize(augmented, self.mean.to(images.device), self.std.to(images.device))

    def extra_repr(self) -> str:
        """Shows the config in the module's repr."""
        return repr(self.config)


class TwoViewPhotometric(nn.Module):
    """BYOL's asymmetric photometric augmentation of a pair of views from :class:`TwoViewCrop`.

    Args:
        view_a: Config of the first view (blurred always, never solarized, in BYOL).
        view_b: Config of the second view (blurred rarely, sometimes solarized).
    """

    def __init__(
        self, view_a: PhotometricConfig = BYOL_VIEW_A, view_b: PhotometricConfig = BYOL_VIEW_B
    ) -> None:
        super().__init__()
        self.view_a = BatchPhotometric(view_a)
        self.view_b = BatchPhotometric(view_b)

    def forward(self, view_a: Tensor, view_b: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the two augmented, normalised float32 views of uint8 ``[B, 3, H, W]``."""
        return self.view_a(view_a), self.view_b(view_b)
