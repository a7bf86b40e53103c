"""Reading a source dataset's layout into validated inputs per split.

Four layouts are understood (paths relative to the source URI):

* ``imagefolder``: ``<split>/<class>/**/<image>``; without split folders the whole tree is
  one ``train`` split with the classes at the top (``prep.folders``).
* ``coco``: ``annotations/instances_<split>.json`` with images in ``images/<file_name>`` or
  ``<split>/<file_name>`` (COCO 2017's own ``train2017/`` style) (``prep.coco``).
* ``voc``: ``ImageSets/Segmentation/<split>.txt``, ``JPEGImages/<id>.jpg``,
  ``SegmentationClass/<id>.png``; class names from ``classes.txt`` when present
  (``prep.voc``).
* ``flat``: every image under the source (or under each split folder), unlabelled.

Listing looks at names, sizes and annotation files; images are decoded later, in the shard
workers. Every record is validated here, before any shard is written: a bad record is
skipped (or, for one annotation of a kept image, dropped) and listed with its reason, never
silently lost; a file or folder that cannot be read fails the step, naming it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

from ladder_siam.errors import UsageError
from ladder_siam.io import storage
from ladder_siam.io.uri import ObjectChangedError
from ladder_siam.prep.coco import list_coco
from ladder_siam.prep.folders import list_flat, list_imagefolder
from ladder_siam.prep.listing import Files, SourceListing
from ladder_siam.prep.voc import list_voc

READERS: dict[str, Callable[[str, Files], SourceListing]] = {
    "imagefolder": list_imagefolder,
    "coco": list_coco,
    "voc": list_voc,
    "flat": list_flat,
}
LAYOUTS = tuple(READERS)

# A split becomes a folder of the output, a class name a string in its manifests.
SAFE_SPLIT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SAFE_CLASS = re.compile(r"[^\x00-\x1f\x7f/\\]{1,200}")


def list_source(source: str, layout: str) -> SourceListing:
    """Lists the inputs of ``source`` in ``layout``, sorted, per split.

    Raises:
        ValueError: Unknown layout, or a source with nothing of that layout in it.
        storage.StorageError: The source cannot be listed.
    """
    if layout not in LAYOUTS:
        raise UsageError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    root = source.rstrip("/")
    files = {info.uri[len(root) + 1 :]: info for info in storage.list_files(source)}
    if not files:
        raise UsageError(f"{source}: no files found")
    listing = READERS[layout](source, files)
    _check_names(source, listing)
    if not any(listing.items.values()) and not any(listing.skipped.values()):
        raise UsageError(f"{source}: nothing in the {layout} layout found (see --layout)")
    return listing


def _check_names(source: str, listing: SourceListing) -> None:
    """Refuses split and class names that could not be written safely.

    A split names a folder of the output (from a COCO annotation file's or a VOC list's name,
    so ``instances_...json`` would make it ``..``); a class name is stored in manifests.
    """
    for split in sorted(set(listing.items) | set(listing.skipped)):
        if not SAFE_SPLIT.fullmatch(split):
            raise UsageError(
                f"{source}: split {split!r} (from a file name) is not a safe folder name: "
                "use letters, digits, '.', '_' and '-', starting with a letter or digit"
            )
    for name in listing.classes:
        if not SAFE_CLASS.fullmatch(name):
            raise UsageError(
                f"{source}: class {name!r}: a class name has 1-200 characters and no '/', "
                "'\\' or control characters"
            )


def fingerprint_source(uri: str) -> tuple[str, int, int]:
    """Hashes the listing of ``uri``: every relative key, size and ETag (mtime locally).

    Returns:
        The hex digest, the number of files and their total bytes.

    Raises:
        ValueError: ``uri`` holds no files.
    """
    digest = hashlib.sha256()
    files = total = 0
    prefix = uri.rstrip("/") + "/"
    for info in storage.list_files(uri):
        digest.update(f"{info.uri.removeprefix(prefix)}\0{info.size}\0{info.etag}\n".encode())
        files, total = files + 1, total + info.size
    if files == 0:
        raise UsageError(f"{uri}: no files; is this the source dataset's folder?")
    return digest.hexdigest(), files, total


def require_fingerprint(uri: str, expected: str) -> None:
    """Refuses a source whose listing is no longer the one fingerprinted as ``expected``.

    The pipeline names a dataset's folder after the fingerprint its first step took; shards
    written from a later listing would hold other data under that name. Checked before the
    source is listed for sharding and again before the manifests are committed: with every
    read pinned to the listed version (``storage.read_bytes(uri, etag=...)``), a dataset folder
    then holds exactly what its fingerprint names.

    Raises:
        ObjectChangedError: The source's files, sizes or versions differ from the fingerprint's.
    """
    # The pipeline names folders after a prefix of the digest; compare as much as it gives.
    found = fingerprint_source(uri)[0][: len(expected)]
    if not expected or found != expected:
        raise ObjectChangedError(
            f"{uri}: changed since the run fingerprinted it ({expected[:12]} -> {found[:12]}); "
            "rerun the pipeline to shard it into the new fingerprint's folder"
        )
