"""The manifests that describe a sharded dataset, and how a URI is resolved to one split.

A dataset prepared by ``prepare-shards`` looks like this::

    DEST/manifest.json                 # DatasetManifest: the splits and totals (commit point)
    DEST/train/manifest.json           # SplitManifest: shards, counts, classes, skipped inputs
    DEST/train/shard-000000.tar ...

Shard URIs in a split manifest are relative to the manifest's folder, so a dataset can be
copied between buckets or from a laptop to S3 and still be read. A split folder inside a
dataset folder is read only while the dataset manifest lists it, so a split that a re-prepared
dataset dropped is never read by mistake; a split copied on its own is read as it is.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from typing import Any

from ladder_siam.errors import UsageError
from ladder_siam.io import storage

MANIFEST_NAME = "manifest.json"
FORMAT = "ladder-siam-shards/1"
# A segmentation mask's pixels of this value (VOC's object boundaries) belong to no class.
IGNORE_LABEL = 255


class ManifestError(UsageError):
    """A manifest is missing, malformed or not what the command needs."""


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a split: its URI (relative to the split folder), samples, bytes, hash."""

    uri: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SkippedInput:
    """An input that was left out, with a short reason category and the details."""

    source: str
    reason: str
    detail: str


@dataclass(frozen=True)
class AnnotationChange:
    """An annotation that was dropped or corrected while its image was kept.

    Attributes:
        source: The annotation file.
        record: Which record (``annotation 12 of image 3``).
        action: ``dropped`` or ``clipped``.
        reason: A short category for counts (``bad-box``, ``unknown-category``...).
        detail: What was wrong, in words.
    """

    source: str
    record: str
    action: str
    reason: str
    detail: str


@dataclass
class SplitManifest:
    """Everything a reader needs to know about one split's shards.

    Attributes:
        split: The split's name (``train``, ``val``...).
        layout: The source layout the shards came from; it decides which fields samples have.
        classes: Class names; a sample's ``cls`` is an index into this list.
        num_samples: Samples in all shards together; it defines the length of an epoch.
        shards: The shards, in order.
        skipped: Inputs that were left out and why.
        fields: The file extensions every sample carries (``jpg``, ``cls``, ``json``, ``png``).
        seed: The shuffle seed the shards were made with.
        max_side: The down-scaling limit applied, if any.
        category_ids: COCO category id of each class (coco), so class ``i`` of the shards is
            ``category_ids[i]`` of the source's annotations.
        annotation_changes: Annotations dropped or clipped while their image was kept.
        source: The source dataset folder the shards were prepared from.
        location: The folder URI this manifest was read from (not stored).
        shard_size: The ``--shard-size`` the shards were prepared with (None: not recorded).
    """

    split: str
    layout: str
    classes: list[str]
    num_samples: int
    shards: list[ShardEntry]
    skipped: list[SkippedInput] = field(default_factory=list)
    fields: list[str] = field(default_factory=lambda: ["jpg"])
    seed: int = 0
    max_side: int | None = None
    category_ids: list[int] | None = None
    annotation_changes: list[AnnotationChange] = field(default_factory=list)
    source: str = ""
    location: str = ""
    shard_size: int | None = None

    def repair_command(self) -> str | None:
        """The ``prepare-shards`` command that rewrites this split's damaged shards in place.

        A rerun with the options the shards were made with hashes every shard it keeps and
        writes again each one that no longer matches. The result is for a message, not for a
        shell: values are quoted only so that a user can paste it.

        Returns:
            The command, or None when the manifest does not record its source or shard size.
        """
        if not self.source or self.shard_size is None:
            return None
        options = [
            ("--source", self.source),
            ("--dest", _dataset_folder(self.location)),
            ("--layout", self.layout),
            ("--shard-size", str(self.shard_size)),
            ("--seed", str(self.seed)),
        ]
        if self.max_side is not None:
            options.append(("--max-side", str(self.max_side)))
        return " ".join(
            ["ladder-siam prepare-shards", *(f"{flag} {shlex.quote(v)}" for flag, v in options)]
        )

    def require_layout(self, *layouts: str) -> None:
        """Raises ``ManifestError`` unless the shards came from one of ``layouts``."""
        if self.layout not in layouts:
            raise ManifestError(
                f"{_manifest_uri(self.location)}: shards of the {self.layout} layout, but this "
                f"step needs {' or '.join(layouts)} shards"
            )

    def shard_uris(self) -> list[str]:
        """Absolute URIs of the shards, each proven to lie inside the split's folder.

        Raises:
            ManifestError: A shard path is absolute or climbs out of the folder (``../``): a
                manifest must not make a reader open any file it names.
        """
        try:
            return [storage.join_under(self.location, shard.uri) for shard in self.shards]
        except storage.StorageError as error:
            raise ManifestError(f"{_manifest_uri(self.location)}: {error}") from error

    def to_json(self) -> str:
        """The manifest as stable, human-readable JSON (``location`` left out)."""
        data = {"format": FORMAT, **asdict(self)}
        data.pop("location")
        return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, location: str) -> SplitManifest:
        """Parses a split manifest read from the folder ``location``."""
        return cls._from_dict(_parse(text, location), location)

    @classmethod
    def _from_dict(cls, data: dict[str, Any], location: str) -> SplitManifest:
        try:
            data["shards"] = [ShardEntry(**shard) for shard in data["shards"]]
            data["skipped"] = [SkippedInput(**item) for item in data.get("skipped", [])]
            data["annotation_changes"] = [
                AnnotationChange(**item) for item in data.get("annotation_changes", [])
            ]
            return cls(**data, location=location)
        except (KeyError, TypeError) as error:
            raise ManifestError(
                f"{_manifest_uri(location)}: malformed split manifest: {error}"
            ) from error


@dataclass(frozen=True)
class SplitSummary:
    """A split's entry in the dataset manifest."""

    manifest: str
    num_samples: int
    num_shards: int
    num_skipped: int


@dataclass
class DatasetManifest:
    """The index of a dataset's splits, written last: its presence means the dataset is complete."""

    layout: str
    classes: list[str]
    splits: dict[str, SplitSummary]
    source: str = ""
    category_ids: list[int] | None = None
    location: str = ""

    def to_json(self) -> str:
        """The manifest as stable, human-readable JSON (``location`` left out)."""
        data = {"format": FORMAT, **asdict(self)}
        data.pop("location")
        data["totals"] = {
            "num_samples": sum(s.num_samples for s in self.splits.values()),
            "num_shards": sum(s.num_shards for s in self.splits.values()),
            "num_skipped": sum(s.num_skipped for s in self.splits.values()),
        }
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, location: str) -> DatasetManifest:
        """Parses a dataset manifest read from the folder ``location``."""
        return cls._from_dict(_parse(text, location), location)

    @classmethod
    def _from_dict(cls, data: dict[str, Any], location: str) -> DatasetManifest:
        data.pop("totals", None)
        try:
            data["splits"] = {k: SplitSummary(**v) for k, v in data["splits"].items()}
            return cls(**data, location=location)
        except (KeyError, TypeError, AttributeError) as error:
            raise ManifestError(
                f"{_manifest_uri(location)}: malformed dataset manifest: {error}"
            ) from error


def _dataset_folder(split_folder: str) -> str:
    """The folder of the dataset that ``split_folder`` is a split of (``DEST`` of ``DEST/val``)."""
    folder = split_folder.rstrip("/")
    return storage.parent(folder) if "/" in folder else "."


def _manifest_uri(location: str) -> str:
    return storage.join(location, MANIFEST_NAME)


def _parse(text: str, location: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{_manifest_uri(location)}: not valid JSON: {error}") from error
    if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
        raise ManifestError(f"{_manifest_uri(location)}: not a {FORMAT} manifest")
    return data


def load_split(uri: str, default_split: str = "train") -> SplitManifest:
    """Loads the split a command should read, from a split's or a dataset's URI.

    Args:
        uri: A split folder (``DEST/val``), a dataset folder (``DEST``), or either's
            ``manifest.json``.
        default_split: The split to take when ``uri`` names a whole dataset.

    Raises:
        ManifestError: There is no manifest, the dataset has no such split, or the split's
            folder lies in a dataset folder whose dataset manifest no longer lists it.
    """
    folder = storage.parent(uri) if uri.rstrip("/").endswith(MANIFEST_NAME) else uri.rstrip("/")
    manifest_uri = _manifest_uri(folder)
    try:
        text = storage.read_text(manifest_uri)
    except FileNotFoundError as error:
        raise ManifestError(
            f"{manifest_uri}: no manifest; run `ladder-siam prepare-shards` to make one"
        ) from error
    data = _parse(text, folder)
    if "splits" not in data:
        split = SplitManifest._from_dict(data, folder)
        _require_listed(split)
        return split
    dataset = DatasetManifest._from_dict(data, folder)
    if default_split not in dataset.splits:
        raise ManifestError(
            f"{manifest_uri}: dataset has no split {default_split!r} "
            f"(it has {', '.join(sorted(dataset.splits))}); pass the split's URI instead"
        )
    entry = dataset.splits[default_split]
    split_folder = storage.parent(storage.resolve(folder, entry.manifest))
    return SplitManifest.from_json(storage.read_text(_manifest_uri(split_folder)), split_folder)


def _require_listed(split: SplitManifest) -> None:
    """Refuses a split whose dataset, re-prepared, no longer lists it.

    A split copied on its own (its parent holds no dataset manifest) is read as it is.

    Raises:
        ManifestError: The parent folder's dataset manifest does not list the split.
    """
    parent = _dataset_folder(split.location)
    try:
        data = _parse(storage.read_text(_manifest_uri(parent)), parent)
    except (FileNotFoundError, ManifestError):
        return  # no dataset of ours around the split
    listed = data.get("splits")
    name = split.location.rstrip("/").rsplit("/", 1)[-1]
    if not isinstance(listed, dict) or name in listed:
        return
    raise ManifestError(
        f"{_manifest_uri(split.location)}: stale split: the dataset prepared at {parent} no "
        f"longer has a split {name!r} (it has {', '.join(sorted(listed)) or 'none'}); read "
        f"one of those, or prepare the dataset again from a source that has {name!r}"
    )
