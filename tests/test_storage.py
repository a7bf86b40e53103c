"""Storage against local folders and a real S3 server (moto, on loopback)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ladder_siam.io import s3, storage
from ladder_siam.io.s3 import S3RangeReader
from ladder_siam.io.uri import StorageError


@pytest.fixture(params=["local", "file", pytest.param("s3", marks=pytest.mark.integration)])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return f"file://{tmp_path}/root"
    return request.getfixturevalue("s3_bucket") + "/root"


def test_write_read_list_roundtrip(root: str) -> None:
    storage.write_bytes(storage.join(root, "b/two.bin"), b"2" * 10)
    storage.write_text(storage.join(root, "a/ünïcode name.txt"), "héllo")
    storage.write_bytes(storage.join(root, "c.bin"), b"")

    listed = list(storage.list_files(root))
    names = [info.uri[len(root) + 1 :] for info in listed]
    assert names == ["a/ünïcode name.txt", "b/two.bin", "c.bin"]
    assert [info.size for info in listed] == [6, 10, 0]
    assert storage.read_text(storage.join(root, "a/ünïcode name.txt")) == "héllo"
    assert storage.exists(storage.join(root, "b/two.bin"))
    assert not storage.exists(storage.join(root, "b/missing.bin"))
    assert storage.size(storage.join(root, "b/two.bin")) == 10


def test_missing_file_errors_name_the_uri(root: str) -> None:
    missing = storage.join(root, "nope/missing.bin")
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        storage.read_bytes(missing)
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        storage.size(missing)


def test_failed_atomic_write_leaves_nothing(root: str) -> None:
    target = storage.join(root, "x/partial.bin")
    storage.write_bytes(storage.join(root, "x/keep.bin"), b"keep")
    with pytest.raises(RuntimeError), storage.atomic_write(target) as stream:
        stream.write(b"half of it")
        raise RuntimeError("crash in the middle of a write")
    assert not storage.exists(target)
    assert [info.uri for info in storage.list_files(storage.join(root, "x"))] == [
        storage.join(root, "x/keep.bin")
    ]


def test_atomic_write_replaces_whole_file(root: str) -> None:
    target = storage.join(root, "replace.bin")
    storage.write_bytes(target, b"old content that is longer")
    storage.write_bytes(target, b"new")
    assert storage.read_bytes(target) == b"new"


@pytest.mark.integration
def test_copy_between_local_and_s3(tmp_path, s3_bucket: str) -> None:
    local = str(tmp_path / "src.bin")
    storage.write_bytes(local, bytes(range(256)) * 100)
    storage.copy_file(local, f"{s3_bucket}/copied.bin")
    storage.copy_file(f"{s3_bucket}/copied.bin", str(tmp_path / "back.bin"))
    assert storage.read_bytes(str(tmp_path / "back.bin")) == bytes(range(256)) * 100


@pytest.mark.integration
@pytest.mark.slow
def test_s3_listing_paginates_past_1000_keys(s3_bucket: str) -> None:
    client = storage.s3_client()
    bucket = s3_bucket.removeprefix("s3://")
    for i in range(1105):
        client.put_object(Bucket=bucket, Key=f"many/{i:05d}", Body=b"x")
    client.put_object(Bucket=bucket, Key="many-other/00000", Body=b"x")  # same prefix string
    listed = [info.uri for info in storage.list_files(f"{s3_bucket}/many")]
    assert len(listed) == 1105
    assert listed[0] == f"{s3_bucket}/many/00000" and listed[-1] == f"{s3_bucket}/many/01104"


@pytest.mark.integration
def test_s3_multipart_upload_and_streaming_read(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # S3's smallest part is 5 MiB: 11 MiB in 5 MiB parts is a three-part upload.
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(s3, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
    payload = bytes(range(251)) * (11 * 1024 * 1024 // 251)
    uri = f"{s3_bucket}/big/object.bin"
    with storage.atomic_write(uri) as stream:
        stream.write(payload)
        assert not storage.exists(uri), "visible before the upload completed"
    head = storage.s3_client().head_object(Bucket=s3_bucket[5:], Key="big/object.bin")
    assert head["ETag"].strip('"').endswith("-3"), "expected a three-part multipart ETag"
    with storage.open_read(uri) as stream:
        first = stream.read(1000)
        rest = stream.read()
    assert first + rest == payload


@pytest.mark.integration
def test_s3_read_resumes_after_a_broken_connection(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/resume.bin"
    payload = bytes(range(256)) * 4096
    storage.write_bytes(uri, payload)
    reader = S3RangeReader(uri)
    first = reader.read(1000)
    reader.body.close()  # the connection drops mid-object
    rest = b"".join(iter(lambda: reader.read(65536), b""))
    assert first + rest == payload


@pytest.mark.integration
def test_s3_errors_name_the_uri(s3_bucket: str) -> None:
    with pytest.raises(FileNotFoundError, match=r"s3://.*/absent\.bin"):
        storage.read_bytes(f"{s3_bucket}/absent.bin")
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket-here"):
        list(storage.list_files("s3://no-such-bucket-here/prefix"))


def test_local_listing_of_missing_folder_fails_clearly(tmp_path) -> None:
    with pytest.raises(storage.StorageError, match="no such directory"):
        list(storage.list_files(str(tmp_path / "absent")))


def test_local_listing_fails_on_a_broken_symbolic_link_naming_it(tmp_path) -> None:
    storage.write_text(str(tmp_path / "data/a/kept.txt"), "kept")
    (tmp_path / "data/a/linked.txt").symlink_to(tmp_path / "data/a/kept.txt")
    names = [info.uri for info in storage.list_files(str(tmp_path / "data"))]
    assert names == [str(tmp_path / "data/a/kept.txt"), str(tmp_path / "data/a/linked.txt")]

    (tmp_path / "data/a/gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(StorageError, match=r"data/a/gone\.txt: cannot list: .*broken symbolic"):
        list(storage.list_files(str(tmp_path / "data")))


def test_delete_folder_deletes_everything_under_it_and_nothing_beside(root: str) -> None:
    for name in ("old/a.bin", "old/_receipts/a.bin.json", "older/kept.bin", "kept.bin"):
        storage.write_bytes(storage.join(root, name), b"x")
    storage.delete_folder(storage.join(root, "old"))
    listed = [info.uri[len(root) + 1 :] for info in storage.list_files(root)]
    assert listed == ["kept.bin", "older/kept.bin"]
    storage.delete_folder(storage.join(root, "old"))  # already gone: not an error


def test_sha256_streams_the_file(root: str) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    storage.write_bytes(storage.join(root, "big.bin"), data)
    assert storage.sha256(storage.join(root, "big.bin")) == hashlib.sha256(data).hexdigest()


def test_local_files_get_ordinary_permissions(tmp_path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    storage.write_text(str(tmp_path / "report.html"), "<html></html>")
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("region", ["", None])
def test_s3_without_an_endpoint_or_a_region_says_which_to_set(
    region: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in a pod whose Secret has an empty AWS_DEFAULT_REGION line, and no AWS config file.
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    if region is None:
        monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    else:
        monkeypatch.setenv("AWS_DEFAULT_REGION", region)
    monkeypatch.setattr(s3, "_clients", {})  # a client is configured when first made
    with pytest.raises(StorageError, match=r"no endpoint and no region.*AWS_DEFAULT_REGION"):
        storage.exists("s3://bucket/key")
