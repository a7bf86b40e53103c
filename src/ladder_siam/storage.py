"""One small interface over object storage (``s3://bucket/key``) and local paths.

Every step reads and writes through these functions, so a run works the same on a laptop
(plain paths or ``file://`` URIs) and on a cluster (S3, MinIO, SeaweedFS). Writes are atomic:
a reader never sees a half-written object. Locally that is a temporary file renamed into place;
on S3 the object appears only when its (possibly multipart) upload completes, and a failed
upload is aborted.

S3 endpoints other than AWS are chosen with ``AWS_ENDPOINT_URL`` (read by boto3 itself) or
:func:`set_s3_endpoint`. Credentials come from the usual boto3 chain (environment, Secrets
mounted as env, instance roles); nothing here ever handles them.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlparse

if TYPE_CHECKING:
    from botocore.client import BaseClient

S3_SCHEME = "s3"
# Parts of 64 MiB keep a 1 GiB shard at 16 parts; S3 allows 10,000 parts of at least 5 MiB.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 64 * 1024 * 1024


class StorageError(OSError):
    """An object-storage operation failed; the message names the URI."""


@dataclass(frozen=True)
class FileInfo:
    """One listed object: its URI, size in bytes and version tag (S3 ETag or mtime)."""

    uri: str
    size: int
    etag: str


def is_s3(uri: str) -> bool:
    """Whether ``uri`` points into S3-compatible object storage."""
    return uri.startswith(f"{S3_SCHEME}://")


def _local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        return Path(urlparse(uri).path)
    return Path(uri)


def _existing_file(uri: str) -> Path:
    path = _local_path(uri)
    if not path.is_file():
        raise FileNotFoundError(f"{uri}: no such file")
    return path


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


def parent(uri: str) -> str:
    """The URI of the folder (prefix) that holds ``uri``."""
    return uri.rstrip("/").rsplit("/", 1)[0]


def resolve(base_dir: str, reference: str) -> str:
    """Resolves ``reference`` against the folder ``base_dir``, unless it is already absolute."""
    if "://" in reference or reference.startswith("/"):
        return reference
    return join(base_dir, reference)


def set_s3_endpoint(url: str | None) -> None:
    """Points every S3 client (in this process and its children) at ``url`` (MinIO, SeaweedFS).

    It is set through ``AWS_ENDPOINT_URL`` rather than a module variable so that worker
    processes started later inherit it.
    """
    if url:
        os.environ["AWS_ENDPOINT_URL"] = url
        _clients.clear()


_UMASK = os.umask(0o022)
os.umask(_UMASK)

_clients: dict[tuple[int, int, str | None], BaseClient] = {}


def s3_client() -> BaseClient:
    """A boto3 S3 client for this process and thread, with retries and backoff configured.

    boto3 clients are not safe to share across forked processes, so clients are cached per
    process id (and per thread, as boto3 sessions are not thread-safe either).
    """
    key = (os.getpid(), threading.get_ident(), os.environ.get("AWS_ENDPOINT_URL"))
    client = _clients.get(key)
    if client is None:
        import boto3
        from botocore.config import Config

        config = Config(
            # "adaptive" adds client-side rate limiting on throttling (503 SlowDown) on top of
            # the exponential backoff with jitter of "standard".
            retries={"max_attempts": 10, "mode": "adaptive"},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=32,
        )
        client = boto3.session.Session().client("s3", config=config)
        _clients[key] = client
    return client


def _client_error_code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


def not_found(error: Exception) -> bool:
    """Whether a botocore error means that the object or bucket does not exist."""
    return _client_error_code(error) in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def list_files(prefix: str) -> Iterator[FileInfo]:
    """Lists every object (file) under ``prefix``, recursively, in lexicographic order.

    Args:
        prefix: A folder URI; ``s3://bucket/data`` lists keys under ``data/``.

    Raises:
        StorageError: The prefix does not exist or cannot be listed.
    """
    if is_s3(prefix):
        yield from _list_s3(prefix)
        return
    root = _local_path(prefix)
    if not root.is_dir():
        raise StorageError(f"{prefix}: no such directory")
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    for path in paths:
        stat = path.stat()
        uri = join(prefix, path.relative_to(root).as_posix())
        yield FileInfo(uri=uri, size=stat.st_size, etag=str(stat.st_mtime_ns))


def _list_s3(prefix: str) -> Iterator[FileInfo]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key_prefix = split_s3(prefix)
    if key_prefix and not key_prefix.endswith("/"):
        key_prefix += "/"
    paginator = s3_client().get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=key_prefix):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue  # folder placeholder objects made by some consoles
                yield FileInfo(
                    uri=f"{S3_SCHEME}://{bucket}/{obj['Key']}",
                    size=int(obj["Size"]),
                    etag=str(obj.get("ETag", "")).strip('"'),
                )
    except (ClientError, BotoCoreError) as error:
        raise StorageError(f"{prefix}: cannot list: {error}") from error


def exists(uri: str) -> bool:
    """Whether a file (object) exists at ``uri``."""
    if not is_s3(uri):
        return _local_path(uri).is_file()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if not_found(error):
            return False
        raise StorageError(f"{uri}: {error}") from error
    return True


def delete(uri: str) -> None:
    """Deletes the file (object) at ``uri``; deleting what does not exist is not an error."""
    if not is_s3(uri):
        _local_path(uri).unlink(missing_ok=True)
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    try:
        s3_client().delete_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as error:
        raise StorageError(f"{uri}: cannot delete: {error}") from error


def size(uri: str) -> int:
    """Size of the file (object) at ``uri`` in bytes.

    Raises:
        FileNotFoundError: Nothing exists at ``uri``.
    """
    if not is_s3(uri):
        return _existing_file(uri).stat().st_size
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    except ClientError as error:
        if not_found(error):
            raise FileNotFoundError(f"{uri}: no such object") from error
        raise StorageError(f"{uri}: {error}") from error


def open_read(uri: str) -> BinaryIO:
    """Opens ``uri`` for a streaming, buffered binary read; nothing is downloaded up front.

    On S3 a connection that breaks mid-object is re-opened at the current offset with a
    ranged GET, so a days-long training run survives a flaky network.

    Raises:
        FileNotFoundError: Nothing exists at ``uri``.
    """
    if not is_s3(uri):
        return _existing_file(uri).open("rb")
    from ladder_siam.s3_reader import S3RangeReader

    return io.BufferedReader(S3RangeReader(uri), buffer_size=1024 * 1024)


def read_bytes(uri: str) -> bytes:
    """Reads the whole file (object) at ``uri``."""
    with open_read(uri) as stream:
        return stream.read()


def read_text(uri: str) -> str:
    """Reads the whole file (object) at ``uri`` as UTF-8 text."""
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Writes ``data`` to ``uri`` atomically."""
    with atomic_write(uri) as stream:
        stream.write(data)


def write_text(uri: str, text: str) -> None:
    """Writes UTF-8 ``text`` to ``uri`` atomically."""
    write_bytes(uri, text.encode("utf-8"))


@contextmanager
def atomic_write(uri: str) -> Iterator[BinaryIO]:
    """Yields a binary stream whose content appears at ``uri`` only if the block succeeds.

    Locally the data goes to a hidden temporary file in the destination folder, which is
    renamed over ``uri`` at the end (``os.replace`` is atomic on POSIX). On S3 the data is
    spooled to a temporary file and uploaded at the end, as a multipart upload when large;
    S3 shows an object only once its upload completes and boto3 aborts failed uploads.
    """
    if is_s3(uri):
        with tempfile.TemporaryFile(prefix="ladder-siam-upload-") as spool:
            yield spool
            spool.seek(0)
            _upload(spool, uri)
        return
    path = _local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # No fsync: readers never see a partial file either way, and skipping it makes bulk
        # writes of small files (demo data, receipts) several times faster. A power loss can
        # leave a short file behind, which a rerun detects (shard sizes are checked on resume).
        with os.fdopen(fd, "wb") as stream:
            yield stream
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _upload(stream: BinaryIO, uri: str) -> None:
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    config = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE
    )
    try:
        s3_client().upload_fileobj(stream, bucket, key, Config=config)
    except (ClientError, BotoCoreError) as error:
        raise StorageError(f"{uri}: upload failed: {error}") from error


class ParallelWriter:
    """Writes many files through a thread pool; use as a context manager.

    Writing many small files is latency-bound (an S3 PUT is a round trip, a local atomic
    write is three system calls) and releases the GIL, so a few threads overlap the waits
    while the caller keeps producing. At most ``max_pending`` files are held in memory.
    Leaving the block waits for every write and raises the first failure.

    Args:
        threads: Concurrent writes.
        max_pending: Submitted but unfinished writes held before ``write`` blocks.
    """

    def __init__(self, threads: int = 16, max_pending: int = 256) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="storage-write")
        self._pending: deque[Future[None]] = deque()
        self._max_pending = max_pending

    def write(self, uri: str, data: bytes) -> None:
        """Queues an atomic write of ``data`` to ``uri``."""
        self._pending.append(self._pool.submit(write_bytes, uri, data))
        while len(self._pending) > self._max_pending:
            self._pending.popleft().result()

    def __enter__(self) -> ParallelWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._pool.shutdown(cancel_futures=exc is not None)
        if exc is None:
            for future in self._pending:
                future.result()


def copy_file(source: str, dest: str) -> None:
    """Copies one file between any two URIs (local or S3), atomically at the destination."""
    with open_read(source) as src, atomic_write(dest) as dst:
        shutil.copyfileobj(src, dst, length=1024 * 1024)
