"""Imports Fashion-MNIST from its IDX files into an imagefolder layout of PNGs.

The source is the four gzipped IDX files that Debian's ``dataset-fashion-mnist`` package
installs (or any folder, local or on S3, holding the same files). Under the destination::

    train/<class>/<index>.png   the 60,000 training images
    val/<class>/<index>.png     the 10,000 test images
    README.md                   provenance and licence

``<index>`` is the image's zero-padded position in its IDX file, so every PNG can be traced
back to the original array. PNGs are 8-bit grayscale and lossless.
"""

from __future__ import annotations

import argparse
import gzip
import io
import logging
import math
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ladder_siam.errors import UsageError
from ladder_siam.io import storage

logger = logging.getLogger(__name__)

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
# The official label names, with "/" and spaces replaced so that they are safe folder names.
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
)
# Our split name -> the prefix of its IDX files; the official test set is our val split.
SPLIT_FILES = {"train": "train", "val": "t10k"}
# IDX magic numbers: two zero bytes, 0x08 (unsigned byte data), then the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
IMAGE_SHAPE = (28, 28)
LICENCE = """\
Fashion-MNIST: Copyright (c) 2017 Zalando SE, https://tech.zalando.com
Source: https://github.com/zalandoresearch/fashion-mnist

Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the "Software"), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


class IdxFormatError(UsageError):
    """An IDX file is not what Fashion-MNIST should contain; the message names the file."""


@dataclass(frozen=True)
class FashionMnistSummary:
    """What :func:`import_fashion_mnist` wrote.

    Attributes:
        dest: The destination URI.
        train_images: Number of images in the train split.
        val_images: Number of images in the val split.
        class_names: Folder names of the classes; label ``i`` is ``class_names[i]``.
    """

    dest: str
    train_images: int
    val_images: int
    class_names: tuple[str, ...]


def read_idx(uri: str, magic: int, limit: int | None = None) -> np.ndarray:
    """Reads a gzipped IDX file of unsigned bytes into an array.

    Args:
        uri: The ``.gz`` file, local or on S3.
        magic: The magic number the file must start with; it fixes the number of dimensions.
        limit: Read at most this many items along the first dimension; ``None`` reads all.

    Returns:
        A uint8 array shaped as the header declares, cut to ``limit`` items.

    Raises:
        IdxFormatError: The file is not gzip, has another magic number, or is truncated.
    """
    try:
        with storage.open_read(uri) as raw, gzip.GzipFile(fileobj=raw) as stream:
            found = int.from_bytes(stream.read(4), "big")
            if found != magic:
                raise IdxFormatError(
                    f"{uri}: magic number {found:#010x}, expected {magic:#010x}: not an IDX "
                    "file of the expected kind"
                )
            ndim = magic & 0xFF
            header = stream.read(4 * ndim)
            if len(header) != 4 * ndim:
                raise IdxFormatError(f"{uri}: header ends before its {ndim} dimensions")
            shape = tuple(int(d) for d in np.frombuffer(header, dtype=">u4"))
            count = shape[0] if limit is None else min(shape[0], limit)
            expected = count * math.prod(shape[1:])
            data = stream.read(expected)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise IdxFormatError(f"{uri}: not a readable gzip file: {error}") from error
    if len(data) != expected:
        raise IdxFormatError(f"{uri}: data ends after {len(data)} of {expected} bytes")
    return np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])


def import_fashion_mnist(
    dest: str, source_dir: str = DEFAULT_SOURCE_DIR, limit: int | None = None
) -> FashionMnistSummary:
    """Writes Fashion-MNIST as ``DEST/{train,val}/<class>/<index>.png`` plus a README.

    Args:
        dest: Destination folder URI (local path, ``file://`` or ``s3://bucket/prefix``).
        source_dir: Folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
        limit: Import at most this many images per split (the first ones); ``None`` for all.

    Returns:
        Counts and class names of what was written.

    Raises:
        FileNotFoundError: A source file is missing; the message says how to install it.
        IdxFormatError: A source file is malformed or images and labels do not match.
        ValueError: ``limit`` is below 1.
    """
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be at least 1, got {limit}")
    sources = {
        split: (
            storage.join(source_dir, f"{prefix}-images-idx3-ubyte.gz"),
            storage.join(source_dir, f"{prefix}-labels-idx1-ubyte.gz"),
        )
        for split, prefix in SPLIT_FILES.items()
    }
    # Checked up front so that a missing file fails before anything is written.
    for uri in (uri for pair in sources.values() for uri in pair):
        if not storage.exists(uri):
            raise FileNotFoundError(
                f"{uri}: no such file; install the Debian package {DEBIAN_PACKAGE} "
                f"(apt-get install {DEBIAN_PACKAGE}) or pass the folder holding the "
                "Fashion-MNIST .gz files as the source directory"
            )

    counts = {}
    for split, (images_uri, labels_uri) in sources.items():
        images = read_idx(images_uri, IMAGES_MAGIC, limit)
        labels = read_idx(labels_uri, LABELS_MAGIC, limit)
        _check_pair(images_uri, images, labels_uri, labels)
        uris = [
            storage.join(dest, split, CLASS_NAMES[label], f"{index:05d}.png")
            for index, label in enumerate(labels)
        ]
        with storage.ParallelWriter() as writer:
            for uri, pixels in zip(uris, images, strict=True):
                writer.write(uri, _encode_png(pixels))
        counts[split] = len(labels)
        logger.info("wrote %d %s images to %s", len(labels), split, storage.join(dest, split))

    storage.write_text(storage.join(dest, "README.md"), _readme(sources, counts, limit))
    return FashionMnistSummary(
        dest=dest, train_images=counts["train"], val_images=counts["val"], class_names=CLASS_NAMES
    )


def _check_pair(images_uri: str, images: np.ndarray, labels_uri: str, labels: np.ndarray) -> None:
    if images.shape[1:] != IMAGE_SHAPE:
        raise IdxFormatError(
            f"{images_uri}: images are {images.shape[1:]} pixels, expected {IMAGE_SHAPE}"
        )
    if len(images) != len(labels):
        raise IdxFormatError(
            f"{images_uri} holds {len(images)} images but {labels_uri} {len(labels)} labels"
        )
    if len(labels) and labels.max() >= len(CLASS_NAMES):
        raise IdxFormatError(f"{labels_uri}: label {labels.max()} is not a Fashion-MNIST class")


def _encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _readme(sources: dict[str, tuple[str, str]], counts: dict[str, int], limit: int | None) -> str:
    lines = [
        "# Fashion-MNIST",
        "",
        "Imported by `ladder_siam.prep.fashion_mnist` from the IDX files of the Debian package "
        f"`{DEBIAN_PACKAGE}`. File names are the image's index in its IDX file.",
        "",
        "| split | images | source |",
        "| --- | --- | --- |",
    ]
    for split, (images_uri, labels_uri) in sources.items():
        lines.append(f"| {split} | {counts[split]} | `{images_uri}`, `{labels_uri}` |")
    lines += [
        "",
        f"Images per split capped at {limit}." if limit is not None else "All images imported.",
        "",
        "Classes (label: folder): "
        + ", ".join(f"{label}: `{name}`" for label, name in enumerate(CLASS_NAMES))
        + ".",
        "",
        "## Licence (MIT)",
        "",
        "```",
        LICENCE.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    """The ``import-fashion-mnist`` options, as a parent parser (no ``-h``) for the CLI."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--dest",
        required=True,
        help="Folder to write the imagefolder layout to: a local path, file:// URI or "
        "s3://bucket/prefix.",
    )
    parser.add_argument(
        "--source-dir",
        default=DEFAULT_SOURCE_DIR,
        help="Folder holding the four gzipped IDX files (default: %(default)s, where the "
        f"Debian package {DEBIAN_PACKAGE} installs them).",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="Import only the first LIMIT images of each split, for quick runs and tests "
        "(default: all 60,000 train and 10,000 val images).",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    """Runs :func:`import_fashion_mnist` with parsed options and logs a summary."""
    summary = import_fashion_mnist(args.dest, source_dir=args.source_dir, limit=args.limit)
    logger.info(
        "imported %d train and %d val Fashion-MNIST images into %s",
        summary.train_images,
        summary.val_images,
        summary.dest,
    )
