"""Listing a VOC segmentation source: split lists, class names, images and their masks.

``ImageSets/Segmentation/<split>.txt`` names one image id per line, ``JPEGImages/<id>.jpg``
is the image and ``SegmentationClass/<id>.png`` its mask of class indices; ``classes.txt``,
when present, names one class per line in class-index order (VOC's own 21 otherwise).

Lines are kept whole (an id or a class name may contain spaces) and read as UTF-8 with an
optional byte-order mark (``prep.annotation_files``). An id that names no image or mask, or
repeats an earlier line, is skipped and listed with its line; a class file whose lines could
shift the class ids (an empty line between names, a name twice) fails the step.
"""

from __future__ import annotations

from ladder_siam.io import storage
from ladder_siam.prep.annotation_files import AnnotationFileError, read_lines
from ladder_siam.prep.listing import ETAG_SEPARATOR, Files, SourceItem, SourceListing

LISTS = "ImageSets/Segmentation/"
CLASSES_FILE = "classes.txt"
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def list_voc(source: str, files: Files) -> SourceListing:
    """Lists a VOC source, one split per list file.

    Raises:
        AnnotationFileError: A list or class file that is not UTF-8 text, or a class file
            whose class ids would be ambiguous.
        OSError: A list or class file cannot be read.
    """
    classes = list(VOC_CLASSES)
    if CLASSES_FILE in files:
        classes = read_classes(files[CLASSES_FILE].uri)
    listing = SourceListing(layout="voc", classes=classes)
    for relative in sorted(files):
        if relative.startswith(LISTS) and relative.endswith(".txt"):
            split = relative.removeprefix(LISTS).removesuffix(".txt")
            _list_split(source, files, files[relative].uri, split, listing)
    return listing


def read_classes(uri: str) -> list[str]:
    """Class names, one per line, in class-index order.

    Trailing empty lines are ignored; an empty line between names is refused, as is a name
    given twice, since either would silently shift or merge class ids.

    Raises:
        AnnotationFileError: Naming the file and the line.
    """
    lines = read_lines(uri)
    while lines and not lines[-1][1]:
        lines.pop()
    seen: dict[str, int] = {}
    for number, name in lines:
        if not name:
            raise AnnotationFileError(
                f"{uri}: line {number} is empty; each line names the class of the next index"
            )
        if name in seen:
            raise AnnotationFileError(
                f"{uri}: line {number}: class {name!r} is already named on line {seen[name]}"
            )
        seen[name] = number
    if not seen:
        raise AnnotationFileError(f"{uri}: no class names")
    return list(seen)


def _list_split(source: str, files: Files, uri: str, split: str, listing: SourceListing) -> None:
    seen: dict[str, int] = {}
    for number, image_id in read_lines(uri):
        if not image_id:
            continue
        where = f"{uri} line {number}"
        if image_id in seen:
            detail = f"{where}: {image_id!r} is already listed on line {seen[image_id]}"
            duplicate = storage.join(source, f"JPEGImages/{image_id}")
            listing.skip(split, duplicate, "duplicate-id", detail)
            continue
        seen[image_id] = number
        image = files.get(f"JPEGImages/{image_id}.jpg")
        mask = files.get(f"SegmentationClass/{image_id}.png")
        if image is None or mask is None:
            folder = "JPEGImages" if image is None else "SegmentationClass"
            missing = storage.join(source, f"{folder}/{image_id}")
            detail = f"{where}: {image_id!r} has no {folder} file"
            listing.skip(split, missing, "missing-image", detail)
            continue
        # Both versions, so that a changed mask also invalidates a resumed shard.
        etag = f"{image.etag}{ETAG_SEPARATOR}{mask.etag}"
        item = SourceItem(image.uri, image.size + mask.size, etag, mask=mask.uri)
        listing.add(split, item)
