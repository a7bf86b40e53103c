"""What listing a source yields: its inputs per split, class names, skips and changes.

Each layout's reader (``prep.folders``, ``prep.coco``, ``prep.voc``) fills one
:class:`SourceListing`; ``prep.sources`` picks the reader and checks the names.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

from ladder_siam.data.manifest import AnnotationChange, SkippedInput
from ladder_siam.io import storage
from ladder_siam.prep.images import IMAGE_EXTENSIONS

# Joins an image's and its mask's version tags in one SourceItem.etag; neither an S3 ETag
# (hex, "-<parts>") nor a local mtime (digits) contains it.
ETAG_SEPARATOR = "+"


@dataclass(frozen=True)
class SourceItem:
    """One input sample, its annotation already validated.

    Attributes:
        image: URI of the encoded image.
        size: Its size in bytes, from the listing.
        etag: Its version tag, so a changed file invalidates a resumed shard; with a mask,
            the image's and the mask's joined by :data:`ETAG_SEPARATOR`.
        label: Class index (imagefolder).
        annotation: The validated COCO image record with its ``annotations`` (coco).
        mask: URI of the semantic mask PNG (voc).
    """

    image: str
    size: int
    etag: str
    label: int | None = None
    annotation: dict[str, Any] | None = None
    mask: str | None = None

    @property
    def image_etag(self) -> str:
        """The version tag the image was listed with."""
        return self.etag.split(ETAG_SEPARATOR)[0]

    @property
    def mask_etag(self) -> str:
        """The version tag the mask was listed with (voc)."""
        return self.etag.split(ETAG_SEPARATOR)[1]


@dataclass
class SourceListing:
    """A source's inputs per split, its class names, and what was skipped while listing.

    Attributes:
        layout: The source layout.
        classes: Class names; a label is an index into this list, the same in every split.
        items: The inputs of each split whose records passed validation.
        skipped: Each split's inputs left out while listing, with the reason.
        changes: Each split's annotations dropped or clipped on images that were kept.
        category_ids: COCO category id of each class (coco only).
    """

    layout: str
    classes: list[str]
    items: dict[str, list[SourceItem]] = field(default_factory=dict)
    skipped: dict[str, list[SkippedInput]] = field(default_factory=dict)
    changes: dict[str, list[AnnotationChange]] = field(default_factory=dict)
    category_ids: list[int] | None = None

    def skip(self, split: str, uri: str, reason: str, detail: str) -> None:
        """Lists an input of ``split`` as left out."""
        self.skipped.setdefault(split, []).append(SkippedInput(uri, reason, detail))

    def add(self, split: str, item: SourceItem) -> None:
        """Adds an input to ``split``."""
        self.items.setdefault(split, []).append(item)


Files = dict[str, storage.FileInfo]
"""A source's files by path relative to the source folder."""


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive)."""
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS
