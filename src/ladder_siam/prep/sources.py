"""Reading a source dataset's layout into a list of inputs per split.

Four layouts are understood (paths relative to the source URI):

* ``imagefolder``: ``<split>/<class>/**/<image>``; without split folders the whole tree is
  one ``train`` split with the classes at the top.
* ``coco``: ``annotations/instances_<split>.json`` with images in ``images/<file_name>`` or
  ``<split>/<file_name>`` (COCO 2017's own ``train2017/`` style).
* ``voc``: ``ImageSets/Segmentation/<split>.txt``, ``JPEGImages/<id>.jpg``,
  ``SegmentationClass/<id>.png``; class names from ``classes.txt`` when present.
* ``flat``: every image under the source (or under each split folder), unlabelled.

Listing only looks at names and sizes; images are decoded later, in the shard workers.
Anything unusable found here (a file that is not an image, an annotation that references a
missing file, an unreadable annotation file) is reported as skipped, never silently dropped.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from ladder_siam.data.manifest import SkippedInput
from ladder_siam.io import storage
from ladder_siam.prep.images import IMAGE_EXTENSIONS

LAYOUTS = ("imagefolder", "coco", "voc", "flat")
SPLIT_NAMES = frozenset({"train", "val", "validation", "test"})
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


@dataclass(frozen=True)
class SourceItem:
    """One input sample before validation.

    Attributes:
        image: URI of the encoded image.
        size: Its size in bytes, from the listing.
        etag: Its version tag, so a changed file invalidates a resumed shard.
        label: Class index (imagefolder).
        annotation: The COCO image record with its ``annotations`` (coco).
        mask: URI of the semantic mask PNG (voc).
    """

    image: str
    size: int
    etag: str
    label: int | None = None
    annotation: dict[str, Any] | None = None
    mask: str | None = None


@dataclass
class SourceListing:
    """A source's inputs per split, its class names, and what was skipped while listing."""

    layout: str
    classes: list[str]
    items: dict[str, list[SourceItem]] = field(default_factory=dict)
    skipped: dict[str, list[SkippedInput]] = field(default_factory=dict)
    category_ids: list[int] | None = None


# A split becomes a folder of the output, a class name a string in its manifests.
SAFE_SPLIT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SAFE_CLASS = re.compile(r"[^\x00-\x1f\x7f/\\]{1,200}")


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive)."""
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_source(source: str, layout: str) -> SourceListing:
    """Lists the inputs of ``source`` in ``layout``, sorted, per split.

    Raises:
        ValueError: Unknown layout, or a source with nothing of that layout in it.
        storage.StorageError: The source cannot be listed.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    root = source.rstrip("/")
    files = {info.uri[len(root) + 1 :]: info for info in storage.list_files(source)}
    if not files:
        raise ValueError(f"{source}: no files found")
    reader = {"imagefolder": _imagefolder, "flat": _flat, "coco": _coco, "voc": _voc}[layout]
    listing = reader(source, files)
    _check_names(source, listing)
    if not any(listing.items.values()) and not any(listing.skipped.values()):
        raise ValueError(f"{source}: nothing in the {layout} layout found (see --layout)")
    return listing


def _check_names(source: str, listing: SourceListing) -> None:
    """Refuses split and class names that could not be written safely.

    A split names a folder of the output (from a COCO annotation file's or a VOC list's name,
    so ``instances_...json`` would make it ``..``); a class name is stored in manifests.
    """
    for split in sorted(set(listing.items) | set(listing.skipped)):
        if not SAFE_SPLIT.fullmatch(split):
            raise ValueError(
                f"{source}: split {split!r} (from a file name) is not a safe folder name: "
                "use letters, digits, '.', '_' and '-', starting with a letter or digit"
            )
    for name in listing.classes:
        if not SAFE_CLASS.fullmatch(name):
            raise ValueError(
                f"{source}: class {name!r}: a class name has 1-200 characters and no '/', "
                "'\\' or control characters"
            )


def _split_of(relative: str) -> tuple[str | None, str]:
    head, _, rest = relative.partition("/")
    return (head, rest) if rest and head.lower() in SPLIT_NAMES else (None, relative)


def _has_splits(files: dict[str, storage.FileInfo]) -> bool:
    return any(_split_of(relative)[0] for relative in files)


def _imagefolder(source: str, files: dict[str, storage.FileInfo]) -> SourceListing:
    with_splits = _has_splits(files)
    entries: list[tuple[str, str, str, storage.FileInfo]] = []
    listing = SourceListing(layout="imagefolder", classes=[])
    for relative, info in sorted(files.items()):
        split, rest = _split_of(relative) if with_splits else ("train", relative)
        if split is None:
            _skip(listing, "train", info.uri, "unknown-split", "outside the split folders")
            continue
        class_name, _, name = rest.partition("/")
        if not name:
            _skip(listing, split, info.uri, "no-class", "not inside a class folder")
        elif not is_image_name(name):
            _skip(listing, split, info.uri, "not-an-image", "not an image file extension")
        else:
            entries.append((split, class_name, relative, info))
    listing.classes = sorted({class_name for _, class_name, _, _ in entries})
    index = {name: i for i, name in enumerate(listing.classes)}
    for split, class_name, _, info in entries:
        item = SourceItem(info.uri, info.size, info.etag, label=index[class_name])
        listing.items.setdefault(split, []).append(item)
    return listing


def _flat(source: str, files: dict[str, storage.FileInfo]) -> SourceListing:
    with_splits = _has_splits(files)
    listing = SourceListing(layout="flat", classes=[])
    for relative, info in sorted(files.items()):
        split = (_split_of(relative)[0] if with_splits else None) or "train"
        if is_image_name(relative):
            listing.items.setdefault(split, []).append(SourceItem(info.uri, info.size, info.etag))
        else:
            _skip(listing, split, info.uri, "not-an-image", "not an image file extension")
    return listing


def _coco(source: str, files: dict[str, storage.FileInfo]) -> SourceListing:
    listing = SourceListing(layout="coco", classes=[])
    categories: dict[int, str] = {}
    for relative in sorted(files):
        name = posixpath.basename(relative)
        if not (relative.startswith("annotations/instances_") and name.endswith(".json")):
            continue
        split = name.removeprefix("instances_").removesuffix(".json")
        uri = files[relative].uri
        try:
            coco = json.loads(storage.read_text(uri))
            split_categories = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
            images = {int(image["id"]): dict(image, annotations=[]) for image in coco["images"]}
            for annotation in coco.get("annotations", []):
                images[int(annotation["image_id"])]["annotations"].append(annotation)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            _skip(listing, split, uri, "bad-annotation", f"unreadable annotation file: {error}")
            continue
        categories.update(split_categories)
        for image in sorted(images.values(), key=lambda record: str(record["file_name"])):
            candidates = (f"images/{image['file_name']}", f"{split}/{image['file_name']}")
            found = next((files[c] for c in candidates if c in files), None)
            if found is None:
                missing = storage.join(source, candidates[0])
                _skip(listing, split, missing, "missing-image", "listed in the annotations")
                continue
            item = SourceItem(found.uri, found.size, found.etag, annotation=image)
            listing.items.setdefault(split, []).append(item)
    listing.category_ids = sorted(categories)
    listing.classes = [categories[i] for i in listing.category_ids]
    return listing


def _voc(source: str, files: dict[str, storage.FileInfo]) -> SourceListing:
    listing = SourceListing(layout="voc", classes=list(VOC_CLASSES))
    if "classes.txt" in files:
        names = storage.read_text(files["classes.txt"].uri).split()
        listing.classes = [name.strip() for name in names if name.strip()]
    for relative in sorted(files):
        if not (relative.startswith("ImageSets/Segmentation/") and relative.endswith(".txt")):
            continue
        split = posixpath.basename(relative).removesuffix(".txt")
        for image_id in storage.read_text(files[relative].uri).split():
            image = files.get(f"JPEGImages/{image_id}.jpg")
            mask = files.get(f"SegmentationClass/{image_id}.png")
            if image is None or mask is None:
                missing = "JPEGImages" if image is None else "SegmentationClass"
                uri = storage.join(source, f"{missing}/{image_id}")
                _skip(listing, split, uri, "missing-image", f"{image_id} has no {missing} file")
                continue
            item = SourceItem(
                image.uri, image.size + mask.size, image.etag + mask.etag, mask=mask.uri
            )
            listing.items.setdefault(split, []).append(item)
    return listing


def _skip(listing: SourceListing, split: str, uri: str, reason: str, detail: str) -> None:
    listing.skipped.setdefault(split, []).append(SkippedInput(uri, reason, detail))
