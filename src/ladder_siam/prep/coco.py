"""Validating COCO instance annotations, record by record, before any shard is written.

Each ``annotations/instances_<split>.json`` is checked against the format's own rules (the
COCO data format: https://cocodataset.org/#format-data). Three levels of problem:

* **The file** cannot be parsed, lacks its ``images`` or ``categories`` list, or its
  categories are ambiguous (a malformed category, a repeated id or name, or an id named
  differently in another split): every label would be in doubt, so the step fails, naming the
  file and what is wrong.
* **An image record** is malformed (no ``file_name``, ``"width": "wide"``), shares its id or
  its file with another record (their annotations cannot be told apart), or names a file that
  is not there: the image is skipped and listed with the file and the record.
* **An annotation** is malformed, names an image or category that does not exist, has a box
  that is not finite, is empty or lies outside the image, or a mask inconsistent with the
  image (polygons, RLE in both forms): the annotation is dropped and listed, and its image
  keeps its other annotations, as torchvision's and detectron2's COCO loaders do. A box that
  overhangs the image is clipped to it, and listed too.

What comes out is a clean record per image, holding only what the shards use; the samples
are built from it alone (``prep.samples``), so a label cannot be read twice two ways.
"""

from __future__ import annotations

import math
import posixpath
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ladder_siam.data.manifest import AnnotationChange, SkippedInput
from ladder_siam.io import storage
from ladder_siam.prep.annotation_files import AnnotationFileError, read_json
from ladder_siam.prep.listing import Files, SourceItem, SourceListing

ANNOTATION_PREFIX = "annotations/instances_"
# The largest RLE run pycocotools stores (uint32).
MAX_RUN = 2**32 - 1


@dataclass
class CocoSplit:
    """One split's validated records.

    Attributes:
        categories: Category id -> name, as this split's file lists them.
        images: Clean image records (``id``, ``file_name``, ``width``, ``height``,
            ``annotations``), in file order.
        skipped: Image records left out, with the reason.
        changes: Annotations dropped or clipped on images that were kept.
    """

    categories: dict[int, str]
    images: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[SkippedInput] = field(default_factory=list)
    changes: list[AnnotationChange] = field(default_factory=list)


def list_coco(source: str, files: Files) -> SourceListing:
    """Lists a COCO source: validated records per split, one category list for all splits.

    Images are looked for in ``images/`` and in COCO 2017's ``<split>/`` folders.

    Raises:
        AnnotationFileError: An annotation file that cannot be used at all.
        OSError: An annotation file cannot be read.
    """
    uris = {
        split: files[relative].uri
        for relative in sorted(files)
        if (split := _split_of(relative)) is not None
    }
    splits = {split: read_split(uri) for split, uri in uris.items()}
    categories = merge_categories(splits, uris)
    listing = SourceListing(layout="coco", classes=[], category_ids=sorted(categories))
    listing.classes = [categories[i] for i in listing.category_ids]
    for split, coco in splits.items():
        if coco.skipped:
            listing.skipped[split] = list(coco.skipped)
        if coco.changes:
            listing.changes[split] = list(coco.changes)
        for image in sorted(coco.images, key=lambda record: record["file_name"]):
            candidates = (f"images/{image['file_name']}", f"{split}/{image['file_name']}")
            found = next((files[c] for c in candidates if c in files), None)
            if found is None:
                missing = storage.join(source, candidates[0])
                detail = f"image {image['id']} of {uris[split]}: no such file"
                listing.skip(split, missing, "missing-image", detail)
            else:
                listing.add(split, SourceItem(found.uri, found.size, found.etag, annotation=image))
    return listing


def _split_of(relative: str) -> str | None:
    name = posixpath.basename(relative)
    if relative.startswith(ANNOTATION_PREFIX) and name.endswith(".json"):
        return name.removeprefix("instances_").removesuffix(".json")
    return None


def read_split(uri: str) -> CocoSplit:
    """Reads and validates one COCO instances file.

    Raises:
        AnnotationFileError: The file cannot be parsed or its categories are ambiguous.
        OSError: The file cannot be read.
    """
    coco = read_json(uri)
    if not isinstance(coco, dict):
        raise AnnotationFileError(f"{uri}: expected a JSON object with images and categories")
    for key in ("images", "categories"):
        if not isinstance(coco.get(key), list):
            raise AnnotationFileError(f"{uri}: {key!r} is missing or not a list")
    annotations = coco.get("annotations", [])
    if not isinstance(annotations, list):
        raise AnnotationFileError(f"{uri}: 'annotations' is not a list")
    split = CocoSplit(categories=_categories(uri, coco["categories"]))
    images = _images(uri, coco["images"], split)
    for index, annotation in enumerate(annotations):
        _attach(uri, index, annotation, images, split)
    split.images = [image for image in images.values() if image is not None]
    return split


def merge_categories(splits: Mapping[str, CocoSplit], uris: Mapping[str, str]) -> dict[int, str]:
    """One category list for all splits, so that a class index means the same everywhere.

    A split may list fewer categories than another, but never name one id differently, nor
    give one name two ids.

    Raises:
        AnnotationFileError: Naming both files and the category they disagree on.
    """
    names: dict[int, tuple[str, str]] = {}
    ids: dict[str, tuple[int, str]] = {}
    for split, coco in sorted(splits.items()):
        uri = uris[split]
        for category_id, name in coco.categories.items():
            other_name, other_uri = names.setdefault(category_id, (name, uri))
            if other_name != name:
                raise AnnotationFileError(
                    f"{uri}: category {category_id} is {name!r} here but {other_name!r} in "
                    f"{other_uri}: every split must use one category list"
                )
            other_id, other_uri = ids.setdefault(name, (category_id, uri))
            if other_id != category_id:
                raise AnnotationFileError(
                    f"{uri}: category {name!r} has id {category_id} here but {other_id} in "
                    f"{other_uri}: every split must use one category list"
                )
    return {category_id: name for category_id, (name, _) in names.items()}


def _categories(uri: str, records: list[Any]) -> dict[int, str]:
    categories: dict[int, str] = {}
    for index, record in enumerate(records):
        category_id = _integer(record.get("id")) if isinstance(record, dict) else None
        name = record.get("name") if isinstance(record, dict) else None
        if category_id is None or not isinstance(name, str) or not name.strip():
            raise AnnotationFileError(
                f"{uri}: categories[{index}] needs an integer 'id' and a non-empty 'name', "
                f"got {_short(record)}"
            )
        if category_id in categories:
            raise AnnotationFileError(f"{uri}: category id {category_id} is listed twice")
        if name in categories.values():
            raise AnnotationFileError(f"{uri}: category name {name!r} is listed twice")
        categories[category_id] = name
    return categories


def _images(uri: str, records: list[Any], split: CocoSplit) -> dict[int, dict[str, Any] | None]:
    """Clean image records by id; None marks an id whose records were skipped."""
    valid: list[tuple[int, dict[str, Any]]] = []
    # A malformed record's id still claims its annotations: they go with its skip, and a
    # valid record with the same id could not tell them from its own.
    malformed_ids: list[int] = []
    for index, record in enumerate(records):
        image, problem = _image(record)
        if problem is not None:
            split.skipped.append(SkippedInput(uri, "bad-record", f"images[{index}]: {problem}"))
            if isinstance(record, dict) and (image_id := _integer(record.get("id"))) is not None:
                malformed_ids.append(image_id)
        else:
            valid.append((index, image))
    images: dict[int, dict[str, Any] | None] = dict.fromkeys(malformed_ids)
    id_counts = Counter([*malformed_ids, *(image["id"] for _, image in valid)])
    file_counts = Counter(image["file_name"] for _, image in valid)
    for index, image in valid:
        where = f"images[{index}] (id {image['id']}, {image['file_name']!r})"
        if id_counts[image["id"]] > 1:
            detail = f"{where}: {id_counts[image['id']]} image records share this id"
            split.skipped.append(SkippedInput(uri, "duplicate-id", detail))
            images[image["id"]] = None
        elif file_counts[image["file_name"]] > 1:
            detail = f"{where}: {file_counts[image['file_name']]} image records share this file"
            split.skipped.append(SkippedInput(uri, "duplicate-file", detail))
            images[image["id"]] = None
        else:
            images[image["id"]] = image
    return images


def _image(record: Any) -> tuple[dict[str, Any], str | None]:
    if not isinstance(record, dict):
        return {}, f"expected an object, got {_short(record)}"
    image_id = _integer(record.get("id"))
    if image_id is None:
        return {}, f"'id' {_short(record.get('id'))} is not an integer"
    file_name = record.get("file_name")
    if not isinstance(file_name, str) or not file_name.strip():
        return {}, f"image {image_id}: 'file_name' {_short(file_name)} is not a file name"
    size = {key: _integer(record.get(key)) for key in ("width", "height")}
    for key, value in size.items():
        if value is None or value < 1:
            text = _short(record.get(key))
            return {}, f"image {image_id}: {key!r} {text} is not a positive integer"
    clean = {"id": image_id, "file_name": file_name, **size, "annotations": []}
    return clean, None


def _attach(
    uri: str,
    index: int,
    annotation: Any,
    images: dict[int, dict[str, Any] | None],
    split: CocoSplit,
) -> None:
    """Validates one annotation and adds it to its image, or lists why it was dropped."""

    def change(action: str, reason: str, detail: str) -> None:
        split.changes.append(AnnotationChange(uri, where, action, reason, detail))

    where = f"annotations[{index}]"
    if not isinstance(annotation, dict):
        change("dropped", "bad-record", f"expected an object, got {_short(annotation)}")
        return
    if (annotation_id := _integer(annotation.get("id"))) is not None:
        where = f"annotation {annotation_id}"
    image_id = _integer(annotation.get("image_id"))
    if image_id is None or image_id not in images:
        image_text = _short(annotation.get("image_id"))
        change("dropped", "unknown-image", f"'image_id' {image_text} is not an image of the file")
        return
    image = images[image_id]
    if image is None:
        return  # the image's own skip is listed; its annotations go with it
    where += f" of image {image_id}"
    category_id = _integer(annotation.get("category_id"))
    if category_id is None or category_id not in split.categories:
        category_text = _short(annotation.get("category_id"))
        change("dropped", "unknown-category", f"'category_id' {category_text} is not a category")
        return
    crowd = _integer(annotation.get("iscrowd", 0))
    if crowd not in (0, 1):
        crowd_text = _short(annotation.get("iscrowd"))
        change("dropped", "bad-record", f"'iscrowd' {crowd_text} is neither 0 nor 1")
        return
    width, height = image["width"], image["height"]
    box, problem = _box(annotation.get("bbox"), width, height)
    if problem is not None:
        change("dropped", *problem)
        return
    segmentation, problem_text = _segmentation(annotation.get("segmentation"), height, width)
    if problem_text is not None:
        change("dropped", "bad-segmentation", problem_text)
        return
    if box != [float(v) for v in annotation["bbox"]]:
        change("clipped", "box-clipped", f"bbox {annotation['bbox']} -> {box} on {width}x{height}")
    image["annotations"].append(
        {"bbox": box, "category_id": category_id, "iscrowd": crowd, "segmentation": segmentation}
    )


def _box(value: Any, width: int, height: int) -> tuple[list[float], tuple[str, str] | None]:
    """The box clipped to the image, or why it cannot be used."""
    if not (isinstance(value, list) and len(value) == 4 and all(map(_is_number, value))):
        return [], ("bad-box", f"'bbox' {_short(value)} is not [x, y, width, height]")
    if not all(math.isfinite(v) for v in value):
        return [], ("bad-box", f"'bbox' {value} is not finite")
    x, y, w, h = (float(v) for v in value)
    if w <= 0 or h <= 0:
        return [], ("empty-box", f"'bbox' {value} has no area")
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        return [], ("box-outside", f"'bbox' {value} lies outside the {width}x{height} image")
    if (x0, y0, x1, y1) == (x, y, x + w, y + h):
        return [x, y, w, h], None  # not recomputed: x + w - x need not give w back exactly
    return [x0, y0, x1 - x0, y1 - y0], None


def _segmentation(value: Any, height: int, width: int) -> tuple[Any, str | None]:
    """A segmentation in a checked form: None, ``{"polygons": ...}`` or ``{"counts": [...]}``.

    Both RLE forms come out as uncompressed run lengths that cover the image exactly, so that
    pycocotools never decodes a short run list (it reads past its buffer and invents pixels).
    """
    if value is None or value == []:
        return None, None
    if isinstance(value, list):
        for number, polygon in enumerate(value):
            if not (isinstance(polygon, list) and all(map(_is_number, polygon))):
                return None, f"polygon {number} is not a list of coordinates"
            if len(polygon) < 6 or len(polygon) % 2:
                return None, f"polygon {number} has {len(polygon)} coordinates: not 3+ points"
            if not all(math.isfinite(v) for v in polygon):
                return None, f"polygon {number} has coordinates that are not finite"
            # Rasterising costs time and memory in the polygon's extent: points far outside
            # the image are an error in the record, and would make a hostile one expensive.
            xs, ys = polygon[0::2], polygon[1::2]
            if not (-width <= min(xs) and max(xs) <= 2 * width) or not (
                -height <= min(ys) and max(ys) <= 2 * height
            ):
                return None, f"polygon {number} reaches far outside the {width}x{height} image"
        return {"polygons": [[float(v) for v in polygon] for polygon in value]}, None
    if not isinstance(value, dict):
        return None, f"'segmentation' {_short(value)} is neither polygons nor RLE"
    size = value.get("size")
    if not (isinstance(size, list) and [_integer(v) for v in size] == [height, width]):
        return None, f"RLE size {_short(size)} is not the image's [{height}, {width}]"
    counts = value.get("counts")
    if isinstance(counts, str):
        try:
            counts = rle_string_counts(counts)
        except ValueError as error:
            return None, f"compressed RLE: {error}"
    elif not (isinstance(counts, list) and all(_integer(v) is not None for v in counts)):
        return None, f"RLE counts {_short(counts)} are neither a string nor integers"
    counts = [int(v) for v in counts]
    if any(not 0 <= v <= MAX_RUN for v in counts):
        return None, "RLE counts must be non-negative"
    if sum(counts) != height * width:
        return None, f"RLE counts cover {sum(counts)} pixels, the image has {height * width}"
    return {"counts": counts}, None


def rle_string_counts(text: str) -> list[int]:
    """Decodes COCO's compressed RLE string into run lengths (pycocotools' ``rleFrString``).

    Each run is a little-endian sequence of 5-bit groups offset by 48 (``'0'``); bit 6 says
    another group follows, bit 5 of the last group is the sign; from the third run on, runs
    are stored as the difference to the run two places earlier.

    Raises:
        ValueError: A character outside the code, or a run cut off by the end of the string.
    """
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position == len(text):
                raise ValueError("the string ends inside a run")
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"character {text[position]!r} is not part of the code")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def _integer(value: Any) -> int | None:
    """An integer from JSON: ``3`` or ``3.0`` (some exporters), never ``true`` or ``"3"``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
