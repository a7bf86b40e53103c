"""Validating and normalising one input image for a shard.

Every image is decoded once here, so that a bad file is reported when the shards are made
rather than crashing a training run days later. What comes out is always an RGB JPEG: EXIF
orientation applied, grayscale / CMYK / palette / 16-bit / alpha images converted, and
optionally down-scaled so that its longer side is at most ``max_side``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
JPEG_QUALITY = 90
# Alpha is composited on mid-grey: a transparent pixel's colour is undefined and grey is the
# neutral value after the per-channel normalisation used in training.
ALPHA_BACKGROUND = (128, 128, 128)


class InvalidImageError(ValueError):
    """The input cannot become a training image; ``reason`` is a short category for counts."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class NormalizedImage:
    """An input image ready for a shard.

    Attributes:
        jpeg: The RGB JPEG bytes to store.
        width: Width of the stored image.
        height: Height of the stored image.
        source_size: (width, height) of the decoded input after EXIF orientation.
        scale: stored size / source size, to rescale annotations.
        exif_transposed: Whether an EXIF orientation other than "normal" was applied.
    """

    jpeg: bytes
    width: int
    height: int
    source_size: tuple[int, int]
    scale: float
    exif_transposed: bool


def decode(data: bytes) -> Image.Image:
    """Decodes ``data`` fully, turning every failure into an :class:`InvalidImageError`."""
    if not data:
        raise InvalidImageError("empty", "zero-byte file")
    try:
        # PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS (~179 Mpx) when it reads the header,
        # which stops a 40-byte PNG that claims 100k x 100k pixels from taking the worker's memory.
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as error:
        raise InvalidImageError("decompression-bomb", str(error)) from error
    except Image.UnidentifiedImageError as error:
        raise InvalidImageError("not-an-image", "cannot identify image format") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        reason = "truncated" if "truncated" in str(error).lower() else "corrupt"
        raise InvalidImageError(reason, str(error) or type(error).__name__) from error
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB without the surprises of a bare ``convert``.

    ``convert("RGB")`` clips 16- and 32-bit images instead of scaling them, and drops alpha
    leaving whatever colour transparent pixels happened to carry.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        if image.mode == "I" and top <= 65535.0 and array.max() > 255:
            top = 65535.0  # PNG 16-bit greyscale opened as mode I
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def normalize(data: bytes, max_side: int | None = None, apply_exif: bool = True) -> NormalizedImage:
    """Validates one encoded image and returns it as an RGB JPEG ready for a shard.

    The original bytes are kept when they already are a baseline RGB JPEG with normal
    orientation that needs no down-scaling: re-encoding would only lose quality and time.

    Args:
        data: The encoded input file.
        max_side: Down-scale so that the longer side is at most this many pixels.
        apply_exif: Apply the EXIF orientation tag (off when annotations refer to raw pixels).

    Raises:
        InvalidImageError: The data is empty, corrupt, truncated, not an image or a
            decompression bomb.
    """
    image = decode(data)
    transposed = False
    if apply_exif and image.getexif().get(0x0112, 1) != 1:
        image = ImageOps.exif_transpose(image)
        transposed = True
    source_size = image.size
    scale = 1.0
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = to_rgb(image).resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    keep_original = image.format == "JPEG" and image.mode == "RGB" and scale == 1.0
    if keep_original and not transposed:
        jpeg = data
    else:
        buffer = io.BytesIO()
        to_rgb(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        jpeg = buffer.getvalue()
    return NormalizedImage(
        jpeg=jpeg,
        width=image.width,
        height=image.height,
        source_size=source_size,
        scale=scale,
        exif_transposed=transposed,
    )
