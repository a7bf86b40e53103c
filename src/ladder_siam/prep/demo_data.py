"""Writes the built-in demo dataset: generated shape scenes in three standard layouts.

Under the destination (a local path, ``file://`` URI or ``s3://bucket/prefix``)::

    imagefolder/{train,val}/<class>/<id>.jpg      class = the image-level label
    coco/images/<id>.jpg                          every split in one folder
    coco/annotations/instances_{train,val}.json   COCO instances, RLE masks
    voc/JPEGImages/<id>.jpg
    voc/SegmentationClass/<id>.png                VOC palette, pixel value = class index
    voc/ImageSets/Segmentation/{train,val}.txt
    voc/classes.txt                               background, then the six classes
    demo.json                                     what was generated, and how

``<id>`` is the image index zero-padded to six digits, which is also its COCO image id. The first
``round(images * (1 - val_fraction))`` indices form the train split and the rest the val split.
A class that labels no image of a split has no imagefolder directory there; ``voc/classes.txt``
and ``demo.json`` list every class. ``demo.json`` is written last, once every other file is in
place, so its presence marks a complete dataset.

Every image is encoded once, so its JPEG bytes are identical in all three layouts, and the same
arguments always give byte-identical files.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ladder_siam.errors import UsageError
from ladder_siam.io import storage
from ladder_siam.prep.scenes import CLASS_NAMES, MIN_IMAGE_SIZE, Scene, render_scene

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
JPEG_QUALITY = 90


@dataclass(frozen=True)
class DemoDataSummary:
    """What :func:`make_demo_data` wrote.

    Attributes:
        dest: The destination URI.
        train_images: Number of images in the train split.
        val_images: Number of images in the val split.
        instances: Number of annotated shape instances over both splits.
        class_names: The class names; class index ``i + 1`` is ``class_names[i]``.
    """

    dest: str
    train_images: int
    val_images: int
    instances: int
    class_names: tuple[str, ...]


def make_demo_data(
    dest: str, images: int = 600, size: int = 96, seed: int = 0, val_fraction: float = 0.2
) -> DemoDataSummary:
    """Generates the demo scenes and writes them in the imagefolder, COCO and VOC layouts.

    Args:
        dest: Destination folder URI (local path, ``file://`` or ``s3://bucket/prefix``).
        images: Number of images over both splits.
        size: Side length of the square images in pixels.
        seed: Seed of the scene set; with ``images`` and ``size`` it fixes every output byte.
        val_fraction: Fraction of the images, taken from the end, that form the val split.

    Returns:
        Counts and class names of what was written.

    Raises:
        ValueError: An argument is out of range.
    """
    if images < 1:
        raise UsageError(f"images must be at least 1, got {images}")
    if size < MIN_IMAGE_SIZE:
        raise UsageError(f"size must be at least {MIN_IMAGE_SIZE} px, got {size}")
    if not 0 <= val_fraction < 1:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train_images = round(images * (1 - val_fraction))
    id_width = max(6, len(str(images - 1)))
    ids: dict[str, list[str]] = {split: [] for split in SPLITS}
    coco = {split: _empty_coco() for split in SPLITS}
    annotation_id = 0

    logger.info("generating %d demo images of %d px with seed %d into %s", images, size, seed, dest)
    with storage.ParallelWriter() as writer:
        for index in range(images):
            split = "train" if index < train_images else "val"
            stem = f"{index:0{id_width}d}"
            scene = render_scene(seed, index, size)
            jpeg = _encode_jpeg(scene.image)
            label_name = CLASS_NAMES[scene.label - 1]
            writer.write(storage.join(dest, "imagefolder", split, label_name, f"{stem}.jpg"), jpeg)
            writer.write(storage.join(dest, "coco", "images", f"{stem}.jpg"), jpeg)
            writer.write(storage.join(dest, "voc", "JPEGImages", f"{stem}.jpg"), jpeg)
            writer.write(
                storage.join(dest, "voc", "SegmentationClass", f"{stem}.png"),
                _encode_segmentation_png(scene.semantic),
            )
            ids[split].append(stem)
            annotation_id = _add_to_coco(coco[split], index, stem, scene, annotation_id)

        for split in SPLITS:
            writer.write(
                storage.join(dest, "coco", "annotations", f"instances_{split}.json"),
                json.dumps(coco[split], separators=(",", ":")).encode(),
            )
            writer.write(
                storage.join(dest, "voc", "ImageSets", "Segmentation", f"{split}.txt"),
                "".join(f"{stem}\n" for stem in ids[split]).encode(),
            )
        writer.write(
            storage.join(dest, "voc", "classes.txt"),
            "".join(f"{name}\n" for name in ("background", *CLASS_NAMES)).encode(),
        )

    summary = DemoDataSummary(
        dest=dest,
        train_images=len(ids["train"]),
        val_images=len(ids["val"]),
        instances=annotation_id,
        class_names=CLASS_NAMES,
    )
    storage.write_bytes(
        storage.join(dest, "demo.json"), _description(summary, seed, size, val_fraction)
    )
    return summary


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # PIL writes neither EXIF nor timestamps, so equal pixels give equal bytes.
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return buffer.getvalue()


def _voc_palette() -> list[int]:
    # The PASCAL VOC colour map: the bits of the class index spread over the high bits of R, G, B.
    palette = []
    for index in range(256):
        rgb = [0, 0, 0]
        value = index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        palette.extend(rgb)
    return palette


VOC_PALETTE = _voc_palette()


def _encode_segmentation_png(semantic: np.ndarray) -> bytes:
    image = Image.fromarray(semantic)
    image.putpalette(VOC_PALETTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _empty_coco() -> dict[str, Any]:
    return {
        "info": {"description": "ladder-siam demo scenes", "version": "1"},
        "licenses": [],
        "images": [],
        "annotations": [],
        "categories": [
            {"id": index + 1, "name": name, "supercategory": "shape"}
            for index, name in enumerate(CLASS_NAMES)
        ],
    }


def _add_to_coco(
    coco: dict[str, Any], index: int, stem: str, scene: Scene, last_annotation_id: int
) -> int:
    """Appends one image and its instances; returns the last annotation id used."""
    height, width = scene.semantic.shape
    coco["images"].append(
        {"id": index, "file_name": f"{stem}.jpg", "width": width, "height": height}
    )
    annotation_id = last_annotation_id
    for instance in scene.instances:
        # COCOeval treats annotation id 0 as "unmatched", so ids start at 1.
        annotation_id += 1
        rle = mask_utils.encode(np.asfortranarray(instance.mask, dtype=np.uint8))
        x0, y0, x1, y1 = instance.box
        coco["annotations"].append(
            {
                "id": annotation_id,
                "image_id": index,
                "category_id": instance.category,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": instance.area,
                "iscrowd": 0,
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
            }
        )
    return annotation_id


def _description(summary: DemoDataSummary, seed: int, size: int, val_fraction: float) -> bytes:
    description = {
        "generator": "ladder_siam.prep.demo_data",
        "seed": seed,
        "images": summary.train_images + summary.val_images,
        "size": size,
        "val_fraction": val_fraction,
        "splits": {"train": summary.train_images, "val": summary.val_images},
        "instances": summary.instances,
        "class_names": list(summary.class_names),
        "layouts": ["imagefolder", "coco", "voc"],
    }
    return (json.dumps(description, indent=2) + "\n").encode()


def get_args_parser() -> argparse.ArgumentParser:
    """The ``make-demo-data`` options, as a parent parser (no ``-h``) for the CLI."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--dest",
        required=True,
        help="Folder to write the dataset to: a local path, file:// URI or s3://bucket/prefix.",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=600,
        help="Number of images over both splits (default: %(default)s, enough for a quick "
        "end-to-end run; raise it for meaningful linear and detection evaluations).",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=96,
        help="Side of the square images in pixels (default: %(default)s, the STL-10 "
        "resolution common in self-supervised benchmarks, small enough for CPU runs; at "
        f"least {MIN_IMAGE_SIZE}).",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the scene set (default: %(default)s); the same seed, image count and "
        "size always produce byte-identical files.",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="Fraction of the images held out as the val split, taken from the highest "
        "indices (default: %(default)s).",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    """Runs :func:`make_demo_data` with parsed ``make-demo-data`` options and logs a summary."""
    summary = make_demo_data(
        args.dest,
        images=args.images,
        size=args.size,
        seed=args.seed,
        val_fraction=args.val_fraction,
    )
    logger.info(
        "wrote %d train and %d val images with %d shape instances (classes: %s) to %s",
        summary.train_images,
        summary.val_images,
        summary.instances,
        ", ".join(summary.class_names),
        summary.dest,
    )
