"""Listing folder layouts: ``imagefolder`` (a class per folder) and ``flat`` (unlabelled).

Split folders are recognised by their structure, not by their name alone, so that a class
may be called ``train``:

* ``imagefolder``: ``<split>/<class>/**/<image>``. The tree has split folders when every
  top-level folder holding images is named ``train``, ``val``, ``validation`` or ``test`` and
  at least one of them holds class folders. A ``train/`` folder with nothing but images
  directly inside is a class. Split-named folders with class folders inside *beside* other
  folders with images could be read either way, and are refused with what to change.
* ``flat``: ``<split>/**/<image>`` when every top-level folder holding images has a split
  name; beside other folders with images, refused likewise.

Without split folders the whole tree is one ``train`` split. A class's label is its index in
the sorted class names, the same in every split.
"""

from __future__ import annotations

from collections import defaultdict

from ladder_siam.errors import UsageError
from ladder_siam.prep.listing import Files, SourceItem, SourceListing, is_image_name

SPLIT_NAMES = frozenset({"train", "val", "validation", "test"})
DEFAULT_SPLIT = "train"


def list_imagefolder(source: str, files: Files) -> SourceListing:
    """Lists class folders, under split folders when the tree has them.

    Raises:
        ValueError: Split folders beside class folders (see the module docstring).
    """
    with_splits = _has_split_folders(source, files, class_folders=True)
    listing = SourceListing(layout="imagefolder", classes=[])
    entries: list[tuple[str, str, SourceItem]] = []
    for relative, info in sorted(files.items()):
        split, rest = _split_of(relative) if with_splits else (DEFAULT_SPLIT, relative)
        if split is None:
            listing.skip(DEFAULT_SPLIT, info.uri, "unknown-split", "outside the split folders")
            continue
        class_name, _, name = rest.partition("/")
        if not name:
            listing.skip(split, info.uri, "no-class", "not inside a class folder")
        elif not is_image_name(name):
            listing.skip(split, info.uri, "not-an-image", "not an image file extension")
        else:
            entries.append((split, class_name, SourceItem(info.uri, info.size, info.etag)))
    listing.classes = sorted({class_name for _, class_name, _ in entries})
    index = {name: i for i, name in enumerate(listing.classes)}
    for split, class_name, item in entries:
        listing.add(split, SourceItem(item.image, item.size, item.etag, label=index[class_name]))
    return listing


def list_flat(source: str, files: Files) -> SourceListing:
    """Lists every image, under split folders when the tree has them.

    Raises:
        ValueError: Split folders beside other folders with images.
    """
    with_splits = _has_split_folders(source, files, class_folders=False)
    listing = SourceListing(layout="flat", classes=[])
    for relative, info in sorted(files.items()):
        split = _split_of(relative)[0] if with_splits else DEFAULT_SPLIT
        if split is None:
            listing.skip(DEFAULT_SPLIT, info.uri, "unknown-split", "outside the split folders")
        elif not is_image_name(relative):
            listing.skip(split, info.uri, "not-an-image", "not an image file extension")
        else:
            listing.add(split, SourceItem(info.uri, info.size, info.etag))
    return listing


def _split_of(relative: str) -> tuple[str | None, str]:
    """``(split, path inside it)``, or ``(None, relative)`` outside any split folder."""
    head, _, rest = relative.partition("/")
    return (head, rest) if rest and head.lower() in SPLIT_NAMES else (None, relative)


def _has_split_folders(source: str, files: Files, class_folders: bool) -> bool:
    """Whether the tree's top-level folders are splits, judged by what they hold.

    Raises:
        ValueError: Split-shaped folders beside other folders with images.
    """
    # Top-level folder -> whether it holds images in subfolders, and directly.
    nested: dict[str, bool] = defaultdict(bool)
    direct: dict[str, bool] = defaultdict(bool)
    for relative in files:
        top, _, rest = relative.partition("/")
        if rest and is_image_name(rest):
            nested[top] |= "/" in rest
            direct[top] |= "/" not in rest
    folders = set(nested)
    split_named = {folder for folder in folders if folder.lower() in SPLIT_NAMES}
    # In imagefolder a split holds class folders: a split-named folder with nothing but
    # images directly inside is a class.
    splits = {f for f in split_named if nested[f]} if class_folders else split_named
    others = folders - split_named
    if not splits or not others:
        return bool(splits)
    inside = "class folders" if class_folders else "images"
    shaped = ", ".join(f"{folder}/" for folder in sorted(splits))
    beside = ", ".join(f"{folder}/" for folder in sorted(others))
    raise UsageError(
        f"{source}: ambiguous layout: {shaped} look like split folders ({inside} inside), "
        f"but {beside} beside them hold images too. Move {beside} into split folders "
        f"(train/, val/, test/), or rename {shaped} if they are classes"
    )
