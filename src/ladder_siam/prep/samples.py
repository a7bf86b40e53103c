"""Turning one listed input into one shard sample, per layout.

A sample is ``<key>.jpg`` (RGB JPEG) plus, depending on the layout, ``<key>.cls`` (class
index as text), ``<key>.json`` (instances: boxes, compressed-RLE masks, classes) and
``<key>.png`` (semantic mask, class index per pixel). When an image is down-scaled or
re-oriented, its annotations are transformed with it.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from ladder_siam.data.manifest import IGNORE_LABEL
from ladder_siam.data.tar_shards import Sample
from ladder_siam.io import storage
from ladder_siam.prep import images
from ladder_siam.prep.images import InvalidImageError, NormalizedImage
from ladder_siam.prep.listing import SourceItem

FIELDS = {
    "imagefolder": ["jpg", "cls"],
    "flat": ["jpg"],
    "coco": ["jpg", "json"],
    "voc": ["jpg", "png"],
}


def build_sample(
    item: SourceItem,
    key: str,
    layout: str,
    max_side: int | None,
    category_index: dict[int, int],
    num_classes: int,
) -> Sample:
    """Reads, validates and converts one input.

    Each file is read at the version this step's listing recorded, never a later one, so a
    shard holds exactly what its receipt's fingerprint names: an object overwritten between
    the listing and its read fails the step instead of entering a shard under the old
    listing's name, and the rerun that KFP (or the user) starts lists the new version.

    Args:
        item: The listed input.
        key: The sample's key in its shard.
        layout: The source layout (decides the sample's fields).
        max_side: Down-scale limit for the longer image side.
        category_index: COCO category id -> contiguous class index.
        num_classes: Classes of the dataset; a VOC mask value must be one of them or the
            ignore label.

    Raises:
        InvalidImageError: The input's content cannot be used; the reason says why.
        ObjectChangedError: A file was overwritten since it was listed. Not a skip either:
            the step fails, and a rerun lists the source afresh.
        OSError: The input could not be read. Not a skip: the shard and the step fail, so
            that a rerun, once storage answers again, includes the input.
    """
    data = storage.read_bytes(item.image, etag=item.image_etag)
    if layout == "coco":
        assert item.annotation is not None
        record = item.annotation
        size = (record["width"], record["height"])
        image = _normalize_to_size(data, max_side, size, "annotation")
        instances = _coco_instances(record, image, category_index)
        return {"__key__": key, "jpg": image.jpeg, "json": json.dumps(instances)}
    if layout == "voc":
        assert item.mask is not None
        mask = images.decode(storage.read_bytes(item.mask, etag=item.mask_etag))
        if mask.mode not in ("P", "L"):
            raise InvalidImageError(
                "bad-mask", f"{item.mask}: mode {mask.mode}, expected class indices"
            )
        values = np.unique(np.asarray(mask))
        unknown = values[(values >= num_classes) & (values != IGNORE_LABEL)]
        if unknown.size:
            raise InvalidImageError(
                "bad-mask",
                f"{item.mask}: values {unknown[:5].tolist()} are not among the {num_classes} "
                f"classes (nor the ignore label {IGNORE_LABEL})",
            )
        image = _normalize_to_size(data, max_side, mask.size, "mask")
        return {"__key__": key, "jpg": image.jpeg, "png": _encode_mask(mask, image)}
    image = images.normalize(data, max_side)
    sample: Sample = {"__key__": key, "jpg": image.jpeg}
    if layout == "imagefolder":
        sample["cls"] = str(item.label)
    return sample


def _normalize_to_size(
    data: bytes, max_side: int | None, size: tuple[int, int], what: str
) -> NormalizedImage:
    """Normalises an annotated image whose annotations were drawn at ``size``.

    Annotation tools disagree on whether EXIF orientation was applied before drawing, so the
    orientation that matches the annotation's size wins.
    """
    image = images.normalize(data, max_side)
    if image.source_size != size and image.exif_transposed:
        image = images.normalize(data, max_side, apply_exif=False)
    if image.source_size != size:
        raise InvalidImageError(
            "size-mismatch", f"image is {image.source_size}, its {what} says {size}"
        )
    return image


def _encode_mask(mask: Image.Image, image: NormalizedImage) -> bytes:
    if image.scale == 1.0:
        target = mask
    else:
        # Nearest keeps class indices valid; interpolating them would invent classes.
        target = mask.resize((image.width, image.height), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    target.save(buffer, format="PNG")
    return buffer.getvalue()


def _coco_instances(
    record: dict[str, Any], image: NormalizedImage, category_index: dict[int, int]
) -> dict[str, Any]:
    """The shard's instances of one validated record (``prep.coco``), scaled with its image."""
    height, width = record["height"], record["width"]
    instances = []
    for annotation in record["annotations"]:
        x, y, w, h = (v * image.scale for v in annotation["bbox"])
        rle = _to_rle(annotation["segmentation"], height, width)
        if rle is not None and image.scale != 1.0:
            rle = _resize_rle(rle, image.width, image.height)
        instances.append(
            {
                "bbox": [x, y, w, h],
                "category": category_index[annotation["category_id"]],
                "category_id": annotation["category_id"],
                "iscrowd": annotation["iscrowd"],
                "area": float(coco_mask.area(rle)) if rle is not None else w * h,
                "segmentation": _jsonable(rle),
            }
        )
    return {
        "image_id": record["id"],
        "file_name": record["file_name"],
        "width": image.width,
        "height": image.height,
        "instances": instances,
    }


def _to_rle(segmentation: dict[str, Any] | None, height: int, width: int) -> dict[str, Any] | None:
    """A validated segmentation (polygons, or run lengths covering the image) as compressed RLE."""
    if segmentation is None:
        return None
    if "polygons" in segmentation:
        return coco_mask.merge(coco_mask.frPyObjects(segmentation["polygons"], height, width))
    runs = {"size": [height, width], "counts": segmentation["counts"]}
    return coco_mask.frPyObjects(runs, height, width)


def _resize_rle(rle: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    binary = coco_mask.decode(rle) * 255
    # Bilinear then a 50 % threshold keeps thin parts better than nearest-neighbour.
    resized = Image.fromarray(binary).resize((width, height), Image.Resampling.BILINEAR)
    return coco_mask.encode(np.asfortranarray(np.asarray(resized) >= 128, dtype=np.uint8))


def _jsonable(rle: dict[str, Any] | None) -> dict[str, Any] | None:
    if rle is None:
        return None
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
