"""The webdataset shard format: writing reproducible tars and streaming samples out of them.

A webdataset shard is a plain tar in which the files of one sample are consecutive and share
a key: ``000042.jpg``, ``000042.cls``. Ours are written so that the same samples always give
the same bytes (fixed mtime, owner and mode), which makes shard preparation verifiable and
lets a rerun recognise its own finished shards. Reading streams through the tar with
``tarfile``'s sequential mode, so a shard on S3 is never downloaded whole.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

Sample = dict[str, bytes | str]
"""One sample: ``__key__`` (str) and one bytes value per file extension (``jpg``, ``cls``...)."""


class _HashingWriter(io.RawIOBase):
    """Passes writes through while counting bytes and computing their SHA-256."""

    def __init__(self, target: BinaryIO) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.bytes_written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.target.write(data)
        self.sha256.update(data)
        self.bytes_written += len(data)
        return len(data)


class ShardWriter:
    """Writes samples into one tar stream; :attr:`sha256` and :attr:`bytes` are final on close.

    Args:
        stream: Where the tar goes (e.g. a :func:`ladder_siam.storage.atomic_write` stream).
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._hashing = _HashingWriter(stream)
        # Closed in close(): the writer outlives this call, so no context manager here.
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=self._hashing, mode="w|", format=tarfile.USTAR_FORMAT
        )
        self.num_samples = 0

    def write(self, sample: Sample) -> None:
        """Appends one sample; its files are written in sorted extension order."""
        key = str(sample["__key__"])
        for extension in sorted(name for name in sample if name != "__key__"):
            value = sample[extension]
            data = value.encode("utf-8") if isinstance(value, str) else value
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0  # reproducible: the same samples give the same bytes
            self._tar.addfile(info, io.BytesIO(data))
        self.num_samples += 1

    def close(self) -> None:
        """Finishes the tar (end-of-archive blocks); the underlying stream stays open."""
        self._tar.close()

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the bytes written so far."""
        return self._hashing.sha256.hexdigest()

    @property
    def bytes(self) -> int:
        """Bytes written so far."""
        return self._hashing.bytes_written


def iter_samples(stream: BinaryIO, skip_data: bool = False) -> Iterator[Sample]:
    """Yields the samples of a tar stream in order, grouping consecutive files by key.

    The key is the file name up to its first dot, as in webdataset. Directories and files
    without an extension are ignored.

    Args:
        stream: A readable binary stream positioned at the start of a tar.
        skip_data: Yield samples with only their key (and extensions mapped to ``b""``),
            reading past the file data; used to fast-forward when resuming.
    """
    current: Sample = {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, name = member.name.rpartition("/")
            stem, dot, extension = name.partition(".")
            if not dot:
                continue
            key = f"{directory}/{stem}" if directory else stem
            if current and current["__key__"] != key:
                yield current
                current = {}
            if not current:
                current = {"__key__": key}
            data = b""
            if not skip_data:
                extracted = tar.extractfile(member)
                data = extracted.read() if extracted is not None else b""
            current[extension] = data
    if current:
        yield current
