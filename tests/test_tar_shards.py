"""iter_samples, the direct tar header reader, against ShardWriter and Python's tarfile."""

from __future__ import annotations

import io
import random
import struct
import tarfile

import pytest

from ladder_siam.data.tar_shards import ShardWriter, iter_samples

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
LONG_PATH = "/".join(f"level{i:02d}_directory" for i in range(7)) + "/sample"  # > 100 chars


class ShortReads:
    """A non-seekable stream whose read(n) returns at most 7 bytes, as a raw socket may."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._inner.read(7 if size < 0 else min(size, 7))


class RecordingReader:
    """Records the size of every read, to check that skipping never materialises a file."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)
        self.sizes: list[int] = []

    def read(self, size: int = -1) -> bytes:
        self.sizes.append(size)
        return self._inner.read(size)


def reference_samples(data: bytes, skip_data: bool = False) -> list[dict]:
    """The grouping of the original tarfile-based iter_samples."""
    samples: list[dict] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, name = member.name.rpartition("/")
            stem, dot, extension = name.partition(".")
            if not dot:
                continue
            key = f"{directory}/{stem}" if directory else stem
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            extracted = tar.extractfile(member)
            assert extracted is not None
            samples[-1][extension] = b"" if skip_data else extracted.read()
    return samples


def build_tar(members: list[tuple[str, str, bytes | str]], tar_format: int, **options) -> bytes:
    """Writes (kind, name, data or link target) members, kind being file, dir or symlink."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tar_format, **options) as tar:
        for kind, name, payload in members:
            info, fileobj = tarfile.TarInfo(name), None
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(payload)
            else:
                assert isinstance(payload, bytes)
                info.size, fileobj = len(payload), io.BytesIO(payload)
            tar.addfile(info, fileobj)
    return out.getvalue()


def rewrite_header(
    data: bytes, offset: int, field: slice, value: bytes, signed: bool = False
) -> bytes:
    """Replaces one field of the header at ``offset`` and recomputes its checksum."""
    header = bytearray(data[offset : offset + 512])
    header[field] = value
    header[148:156] = b" " * 8
    checksum = 256 + sum(struct.unpack_from("148b8x356b" if signed else "148B8x356B", header))
    header[148:155] = b"%06o\0" % checksum
    return data[:offset] + bytes(header) + data[offset + 512 :]


def member_offsets(data: bytes) -> list[int]:
    """Header offsets of the members of a USTAR tar, then the offset where members end."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
    last = members[-1]
    return [member.offset for member in members] + [last.offset_data + -(-last.size // 512) * 512]


def read_all(stream: object, skip_data: bool = False) -> list[dict]:
    return list(iter_samples(stream, skip_data=skip_data))  # type: ignore[arg-type]


def shard(num_samples: int = 3) -> bytes:
    out = io.BytesIO()
    writer = ShardWriter(out)
    for index in range(num_samples):
        writer.write({"__key__": f"{index:06d}", "jpg": bytes([index]) * 700, "cls": str(index)})
    writer.close()
    return out.getvalue()


def test_round_trip_with_shard_writer() -> None:
    samples = [
        {"__key__": "000000", "jpg": b"\xff\xd8" * 300, "cls": "7", "json": '{"a": 1}'},
        {"__key__": "dir/000001", "jpg": b"", "cls": "0"},
        {"__key__": "000002", "png": bytes(range(256)) * 2},
    ]
    out = io.BytesIO()
    writer = ShardWriter(out)
    for sample in samples:
        writer.write(sample)
    writer.close()
    expected = [
        {k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in s.items()}
        for s in samples
    ]
    assert read_all(io.BytesIO(out.getvalue())) == expected
    assert read_all(io.BytesIO(out.getvalue())) == reference_samples(out.getvalue())


def format_members(tar_format: str) -> list[tuple[str, str, bytes | str]]:
    members: list[tuple[str, str, bytes | str]] = [
        ("dir", "shard", b""),
        ("file", "shard/000000.jpg", bytes(range(256)) * 2),  # exactly one block
        ("file", "shard/000000.cls", b"3"),
        ("file", "shard/000001.jpg", b""),
        ("file", "shard/000001.txt", b"x" * 513),
        ("file", "shard/README", b"no extension: ignored, its data skipped" * 20),
        ("symlink", "shard/000002.lnk", "000001.jpg"),
        ("file", f"{LONG_PATH}.tar.gz", b"key up to the first dot"),
        ("file", f"{LONG_PATH}.cls", b"1"),
        ("file", "données/ünïcødé_画像.jpg", "写真".encode()),
        ("file", "données/ünïcødé_画像.cls", b"2"),
        ("file", "shard/000000.json", b"{}"),  # same key, not consecutive: a new sample
    ]
    if tar_format != "ustar":  # USTAR has no room for these
        members += [
            ("file", "deep/" + "b" * 150 + ".jpg", b"long basename"),
            ("symlink", "deep/link.jpg", "t" * 150),
            ("file", "deep/" + "é" * 120 + ".jpg", b"long unicode basename"),
        ]
    return members


@pytest.mark.parametrize("tar_format", sorted(FORMATS))
@pytest.mark.parametrize("skip_data", [False, True])
def test_tarfile_formats_match_the_reference(tar_format: str, skip_data: bool) -> None:
    options = {"pax_headers": {"comment": "global"}} if tar_format == "pax" else {}
    data = build_tar(format_members(tar_format), FORMATS[tar_format], **options)
    samples = read_all(io.BytesIO(data), skip_data)
    assert samples == reference_samples(data, skip_data)
    assert samples == read_all(ShortReads(data), skip_data)
    keys = [sample["__key__"] for sample in samples]
    assert keys[:5] == [
        "shard/000000",
        "shard/000001",
        LONG_PATH,
        "données/ünïcødé_画像",
        "shard/000000",
    ]
    assert samples[0] == {
        "__key__": "shard/000000",
        "jpg": b"" if skip_data else bytes(range(256)) * 2,
        "cls": b"" if skip_data else b"3",
    }
    assert set(samples[2]) == {"__key__", "tar.gz", "cls"}
    if tar_format != "ustar":
        assert keys[5:] == ["deep/" + "b" * 150, "deep/" + "é" * 120]


@pytest.mark.parametrize("tar_format", sorted(FORMATS))
def test_random_sizes_around_block_boundaries(tar_format: str) -> None:
    rng = random.Random(tar_format)
    sizes = [0, 1, 511, 512, 513, 1023, 1024, 1025, 10_240, 70_000]
    members: list[tuple[str, str, bytes | str]] = [
        ("file", f"{index // 3:04d}.{('jpg', 'cls', 'json')[index % 3]}", rng.randbytes(size))
        for index, size in enumerate(rng.choices(sizes, k=60))
    ]
    data = build_tar(members, FORMATS[tar_format])
    for skip_data in (False, True):
        expected = reference_samples(data, skip_data)
        assert len(expected) == 20
        assert read_all(io.BytesIO(data), skip_data) == expected
        assert read_all(ShortReads(data), skip_data) == expected


def test_files_larger_than_a_read_chunk_and_skipping_never_materialises_them() -> None:
    big = random.Random(0).randbytes(3 * 1024 * 1024 + 5)
    members: list[tuple[str, str, bytes | str]] = [
        ("file", "a.bin", big),
        ("file", "a.cls", b"1"),
        ("file", "b.bin", b""),
    ]
    data = build_tar(members, tarfile.USTAR_FORMAT)
    assert read_all(io.BytesIO(data)) == [
        {"__key__": "a", "bin": big, "cls": b"1"},
        {"__key__": "b", "bin": b""},
    ]
    stream = RecordingReader(data)
    assert read_all(stream, skip_data=True) == [
        {"__key__": "a", "bin": b"", "cls": b""},
        {"__key__": "b", "bin": b""},
    ]
    assert max(stream.sizes) <= 1024 * 1024


def test_gnu_base256_size_and_signed_checksum_are_accepted() -> None:
    data = build_tar([("file", "ü.jpg", b"j" * 700), ("file", "ü.cls", b"5")], tarfile.USTAR_FORMAT)
    first, second, _ = member_offsets(data)
    data = rewrite_header(data, first, slice(124, 136), b"\x80" + (700).to_bytes(11, "big"))
    unsigned = data[second + 148 : second + 156]
    data = rewrite_header(data, second, slice(0, 0), b"", signed=True)
    assert data[second + 148 : second + 156] != unsigned  # the name's UTF-8 bytes sum differently
    assert read_all(io.BytesIO(data)) == [{"__key__": "ü", "jpg": b"j" * 700, "cls": b"5"}]
    assert read_all(io.BytesIO(data)) == reference_samples(data)


def test_gnu_header_fields_where_ustar_has_its_prefix_are_not_a_prefix() -> None:
    data = build_tar([("file", "a.jpg", b"1")], tarfile.GNU_FORMAT)
    assert data[257:265] == b"ustar  \0"
    data = rewrite_header(data, 0, slice(345, 357), b"00000000001\0")  # GNU's atime
    # As GNU tar reads it; tarfile would make the atime a directory ("00000000001/a").
    assert read_all(io.BytesIO(data)) == [{"__key__": "a", "jpg": b"1"}]


def test_pax_size_record_overrides_the_header_size() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size, info.pax_headers = 600, {"size": "600"}
        tar.addfile(info, io.BytesIO(b"p" * 600))
    data = out.getvalue()
    header = data.index(b"a.jpg")  # the file's own header, after the PAX one
    data = rewrite_header(data, header, slice(124, 136), b"00000000000\0")
    assert read_all(io.BytesIO(data)) == [{"__key__": "a", "jpg": b"p" * 600}]
    assert read_all(io.BytesIO(data)) == reference_samples(data)


def test_corrupt_checksum_names_the_header_offset() -> None:
    data = bytearray(shard())
    offset = member_offsets(bytes(data))[2]
    data[offset + 3] ^= 0x01
    with pytest.raises(ValueError, match=f"corrupt tar header at byte {offset}: checksum"):
        read_all(io.BytesIO(bytes(data)))


def test_invalid_size_field_is_an_error() -> None:
    data = shard()
    offset = member_offsets(data)[1]
    data = rewrite_header(data, offset, slice(124, 136), b"12x4567\0\0\0\0\0")
    with pytest.raises(ValueError, match=f"at byte {offset}: invalid size"):
        read_all(io.BytesIO(data))


def test_corrupt_pax_record_is_an_error() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size, info.pax_headers = 1, {"comment": "hi"}
        tar.addfile(info, io.BytesIO(b"1"))
    assert read_all(io.BytesIO(out.getvalue())) == [{"__key__": "a", "jpg": b"1"}]
    with pytest.raises(ValueError, match="corrupt PAX header at byte 0"):
        read_all(io.BytesIO(out.getvalue().replace(b"comment=hi", b"comment_hi")))


@pytest.mark.parametrize(
    "where", ["empty", "in a header", "in file data", "in padding", "without end-of-archive"]
)
@pytest.mark.parametrize("skip_data", [False, True])
def test_truncated_streams_are_errors(where: str, skip_data: bool) -> None:
    data = shard()  # members: 000000.cls (1 byte), 000000.jpg (700 bytes), 000001.cls...
    *offsets, end_of_members = member_offsets(data)
    cut = {
        "empty": 0,
        "in a header": offsets[2] + 100,
        "in file data": offsets[1] + 512 + 300,
        "in padding": offsets[1] + 512 + 701,
        "without end-of-archive": end_of_members,
    }[where]
    with pytest.raises(ValueError, match=f"truncated tar stream: it ends at byte {cut}, before"):
        read_all(io.BytesIO(data[:cut]), skip_data)
    with pytest.raises(ValueError, match=f"truncated tar stream: it ends at byte {cut}, before"):
        read_all(ShortReads(data[:cut]), skip_data)
    assert len(read_all(io.BytesIO(data[: end_of_members + 512]), skip_data)) == 3


def test_reading_stops_at_the_end_of_archive_block() -> None:
    data = shard(2) + b"trailing garbage after the archive"
    assert [s["__key__"] for s in read_all(io.BytesIO(data))] == ["000000", "000001"]
