"""URIs: ``s3://bucket/key``, ``file:///abs/path`` or a plain path, and the errors about them.

Everything here is string work with no I/O, so that both the local and the S3 half of
:mod:`ladder_siam.io.storage` can build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

S3_SCHEME = "s3"
SUPPORTED = "s3://bucket/prefix, file:///abs/path or a plain path"


class StorageError(OSError):
    """An object-storage operation failed; the message names the URI."""


class ObjectChangedError(StorageError):
    """An object no longer is the version that was listed: it was overwritten since.

    Not a bad input but a race with whoever writes the source, so it fails the step rather
    than skipping the input; a rerun lists the source afresh.
    """

    @classmethod
    def listed_as(cls, uri: str, listed: str, found: str | None) -> ObjectChangedError:
        """The error for ``uri``, listed at version ``listed`` and now ``found`` (if known)."""
        now = f'"{found}"' if found is not None else "another version"
        # One message argument only: the error crosses process pools, which pickle it.
        return cls(
            f'{uri}: changed since it was listed (ETag "{listed}" -> {now}); '
            "rerun to list it afresh"
        )


@dataclass(frozen=True)
class FileInfo:
    """One listed object: its URI, size in bytes and version tag (S3 ETag or mtime)."""

    uri: str
    size: int
    etag: str


def is_s3(uri: str) -> bool:
    """Whether ``uri`` points into S3-compatible object storage."""
    return uri.startswith(f"{S3_SCHEME}://")


def scheme_problem(uri: str) -> str | None:
    """What is wrong with ``uri``'s scheme, or None for ``s3://``, ``file://`` and plain paths."""
    scheme, separator, _ = uri.partition("://")
    if separator and scheme not in (S3_SCHEME, "file"):
        return f"unsupported scheme {scheme}://; use {SUPPORTED}"
    if scheme == S3_SCHEME and not urlparse(uri).netloc:
        return "no bucket; an S3 URI reads s3://bucket/key"
    return None


def local_path(uri: str) -> Path:
    """The filesystem path of a plain path or ``file://`` URI.

    Raises:
        StorageError: ``uri`` has a scheme this project cannot read (``gs://``...): without
            this check it would be taken for a relative folder named ``gs:``.
    """
    problem = scheme_problem(uri)
    if problem is not None:
        raise StorageError(f"{uri}: {problem}")
    if uri.startswith("file://"):
        return Path(urlparse(uri).path)
    return Path(uri)


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key) of an ``s3://`` URI."""
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"{uri}: an S3 URI needs a bucket, as in s3://bucket/key")
    return parsed.netloc, parsed.path.lstrip("/")


def join(uri: str, *parts: str) -> str:
    """Joins path segments onto a URI with ``/``, whatever its scheme."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def join_under(base: str, *parts: str) -> str:
    """Joins ``parts`` onto the folder ``base``, proving that the result stays inside it.

    Raises:
        StorageError: A part is empty, absolute, or has a ``.`` or ``..`` segment: written
            to, it would land outside ``base`` (or on a name a reader would not find).
    """
    for part in parts:
        segments = part.split("/")
        if part.startswith("/") or any(s in ("", ".", "..") for s in segments):
            raise StorageError(f"{base}: {part!r} would leave the folder; refusing to write it")
    return join(base, *parts)


def parent(uri: str) -> str:
    """The URI of the folder (prefix) that holds ``uri``."""
    return uri.rstrip("/").rsplit("/", 1)[0]


def resolve(base_dir: str, reference: str) -> str:
    """Resolves ``reference`` against the folder ``base_dir``, unless it is already absolute."""
    if "://" in reference or reference.startswith("/"):
        return reference
    return join(base_dir, reference)
