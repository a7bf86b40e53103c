"""The webdataset shard format: writing reproducible tars and streaming samples out of them.

A webdataset shard is a plain tar in which the files of one sample are consecutive and share
a key: ``000042.jpg``, ``000042.cls``. Ours are written so that the same samples always give
the same bytes (fixed mtime, owner and mode), which makes shard preparation verifiable and
lets a rerun recognise its own finished shards. Reading parses the 512-byte tar headers
itself, with large sequential reads: a shard on S3 is never downloaded whole, and the per-member
cost stays far below ``tarfile``'s (which was a third of the loader's time on small images).
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

Sample = dict[str, bytes | str]
"""One sample: ``__key__`` (str) and one bytes value per file extension (``jpg``, ``cls``...)."""

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_CHUNK = 1024 * 1024  # per read: members are small, and every read of an S3 body has a cost
_TRUNCATED = "truncated tar stream: it ends at byte {}, before its end-of-archive block"
_REGULAR = frozenset((b"0", b"\0", b"7"))  # "7" (contiguous) is a regular file to tarfile too
_EXTENSIONS = frozenset((b"L", b"K", b"x", b"X"))  # describe the member that follows them
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")


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
        stream: Where the tar goes (e.g. a :func:`ladder_siam.io.storage.atomic_write` stream).
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
        stream: A readable binary stream positioned at the start of a tar; only ``read`` is
            used, so it need not be seekable.
        skip_data: Yield samples with only their key (and extensions mapped to ``b""``),
            reading past the file data; used to fast-forward when resuming.

    Raises:
        ValueError: A header is corrupt (the message names its byte offset) or the stream
            ends before the end-of-archive block.
    """
    current: Sample = {}
    for path, data in _iter_files(_BlockReader(stream), skip_data):
        directory, _, name = path.rpartition("/")
        stem, dot, extension = name.partition(".")
        if not dot:
            continue
        key = f"{directory}/{stem}" if directory else stem
        if current and current["__key__"] != key:
            yield current
            current = {}
        if not current:
            current = {"__key__": key}
        current[extension] = data
    if current:
        yield current


class _BlockReader:
    """Hands out exact byte counts from a stream read in large chunks, tracking the offset."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._buffer = b""
        self._position = 0  # of the next byte in _buffer
        self._start = 0  # stream offset of _buffer[0]

    @property
    def offset(self) -> int:
        """Stream offset of the next byte."""
        return self._start + self._position

    def take(self, size: int) -> bytes:
        """Returns the next ``size`` bytes; raises ValueError if the stream ends first."""
        if self._position + size > len(self._buffer):
            parts, have = [self._buffer[self._position :]], len(self._buffer) - self._position
            self._start, self._buffer, self._position = self.offset, b"", 0
            while have < size:
                # read() may return less than asked (raw streams); only b"" means the end.
                chunk = self._stream.read(max(size, _CHUNK) - have)
                if not chunk:
                    raise ValueError(_TRUNCATED.format(self._start + have))
                parts.append(chunk)
                have += len(chunk)
            self._buffer = b"".join(parts)
        data = self._buffer[self._position : self._position + size]
        self._position += size
        return data

    def skip(self, size: int) -> None:
        """Reads past ``size`` bytes without keeping them (one chunk in memory at a time)."""
        while self._position + size > len(self._buffer):
            size -= len(self._buffer) - self._position
            self._start += len(self._buffer)
            self._buffer, self._position = self._stream.read(_CHUNK), 0
            if not self._buffer:
                raise ValueError(_TRUNCATED.format(self._start))
        self._position += size


def _iter_files(blocks: _BlockReader, skip_data: bool) -> Iterator[tuple[str, bytes]]:
    """Yields (path, data) for the regular files of a tar; ``b""`` as data when skipping."""
    long_path: str | None = None  # from GNU "L" or PAX "x" headers, for the next member
    pax_size: int | None = None
    while True:
        offset = blocks.offset
        header = blocks.take(_BLOCK)
        if header == _ZERO_BLOCK:
            return
        _check_checksum(header, offset)
        size = _number(header[124:136], offset, "size")
        typeflag = header[156:157]
        if typeflag in _EXTENSIONS:
            payload = blocks.take(size)
            blocks.skip(-size % _BLOCK)
            if typeflag == b"L":
                long_path = _text(payload.split(b"\0", 1)[0])
            elif typeflag != b"K":  # "K", a long link target, says nothing about files
                records = _pax_records(payload, offset)
                long_path = _text(records[b"path"]) if b"path" in records else long_path
                if b"size" in records:  # files of 8 GiB and more
                    pax_size = _number(records[b"size"], offset, "PAX size", base=10)
            continue
        if pax_size is not None:
            size, pax_size = pax_size, None
        path, long_path = long_path or _header_path(header), None
        kept = size if typeflag in _REGULAR and not skip_data else 0
        data = blocks.take(kept)
        blocks.skip(size - kept + -size % _BLOCK)  # the rest, and the padding to a block
        if typeflag in _REGULAR:
            yield path, data


def _check_checksum(header: bytes, offset: int) -> None:
    """Raises ValueError unless the header checksum matches, as unsigned or signed bytes."""
    stored = _number(header[148:156], offset, "checksum")
    # The checksum field itself counts as eight spaces (256).
    unsigned = sum(header) - sum(header[148:156]) + 256
    if stored != unsigned and stored != sum(struct.unpack_from("148b8x356b", header)) + 256:
        raise ValueError(f"corrupt tar header at byte {offset}: checksum {stored} != {unsigned}")


def _number(field: bytes, offset: int, what: str, base: int = 8) -> int:
    """Parses a non-negative octal header field, or a GNU base-256 one (high bit set)."""
    try:
        if field[:1] >= b"\x80":  # GNU base-256 (sizes of 8 GiB and more); 0x40 set = negative
            value = -1 if field[0] & 0x40 else int.from_bytes(field[1:], "big")
        else:
            value = int(field.split(b"\0", 1)[0].strip() or b"0", base)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"corrupt tar header at byte {offset}: invalid {what} {field!r}")
    return value


def _header_path(header: bytes) -> str:
    """The member path: the name field, after the ustar prefix field where there is one."""
    name = header[:100].split(b"\0", 1)[0]
    # GNU headers ("ustar  " magic) use the prefix bytes for other fields.
    if header[257:263] == b"ustar\0" and header[345] != 0:
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return _text(name)


def _pax_records(payload: bytes, offset: int) -> dict[bytes, bytes]:
    """Parses PAX extended-header records: ``<length> <keyword>=<value>`` and a newline."""
    records: dict[bytes, bytes] = {}
    position = 0
    while position < len(payload) and payload[position] != 0:
        match = _PAX_RECORD.match(payload, position)
        end = position + int(match.group(1)) if match else 0
        if not match or end <= match.end() or payload[end - 1 : end] != b"\n":
            raise ValueError(f"corrupt PAX header at byte {offset}: bad record at {position}")
        records[match.group(2)] = payload[match.end() : end - 1]
        position = end
    return records


def _text(name: bytes) -> str:
    """Decodes a name as tarfile does on Linux: UTF-8, undecodable bytes kept as surrogates."""
    return name.decode("utf-8", "surrogateescape")
