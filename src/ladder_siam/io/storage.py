"""One small interface over object storage (``s3://bucket/key``) and local paths.

Every step reads and writes through these functions, so a run works the same on a laptop
(plain paths or ``file://`` URIs) and on a cluster (S3, MinIO, SeaweedFS). Writes are atomic:
a reader never sees a half-written object. Locally that is a temporary file renamed into place;
on S3 the object appears only when its (possibly multipart) upload completes, and a failed
upload is aborted. The S3 side lives in :mod:`ladder_siam.io.s3`, URI parsing in
:mod:`ladder_siam.io.uri`; this module re-exports what callers use of both, so that a step
needs only ``from ladder_siam.io import storage``.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, NoReturn

from ladder_siam.io import s3
from ladder_siam.io.s3 import s3_client, set_s3_endpoint
from ladder_siam.io.uri import (
    FileInfo,
    ObjectChangedError,
    StorageError,
    is_s3,
    join,
    join_under,
    local_path,
    parent,
    resolve,
    scheme_problem,
    split_s3,
)

__all__ = [
    "FileInfo",
    "ObjectChangedError",
    "ParallelWriter",
    "StorageError",
    "atomic_write",
    "copy_file",
    "delete",
    "delete_folder",
    "exists",
    "file_info",
    "is_s3",
    "join",
    "join_under",
    "list_files",
    "open_read",
    "parent",
    "read_bytes",
    "read_text",
    "remove_leftover_temporaries",
    "resolve",
    "s3_client",
    "scheme_problem",
    "set_s3_endpoint",
    "sha256",
    "size",
    "split_s3",
    "write_bytes",
    "write_text",
]

# Local atomic writes go to ".<name>.<random>.tmp" beside their destination.
_TEMPORARY_PREFIX = "."
_TEMPORARY_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _existing_file(uri: str) -> Path:
    path = local_path(uri)
    if not path.is_file():
        raise FileNotFoundError(f"{uri}: no such file")
    return path


def list_files(prefix: str) -> Iterator[FileInfo]:
    """Lists every object (file) under ``prefix``, recursively, in lexicographic order.

    Args:
        prefix: A folder URI; ``s3://bucket/data`` lists keys under ``data/``.

    Raises:
        StorageError: The prefix does not exist or cannot be listed.
    """
    if is_s3(prefix):
        yield from s3.list_objects(prefix)
        return
    yield from _list_local(prefix)


def _list_local(prefix: str) -> Iterator[FileInfo]:
    """Lists the regular files under a local folder, symlinked files included.

    Symlinked folders are not followed: a link to an ancestor would make the listing endless.

    Raises:
        StorageError: A folder cannot be read or a symbolic link is broken. Skipping either
            silently would drop its files from whatever is made of the listing.
    """
    root = local_path(prefix)
    if not root.is_dir():
        raise StorageError(f"{prefix}: no such directory")

    def unlisted(path: str, error: OSError, note: str = "") -> StorageError:
        relative = Path(path).relative_to(root)
        uri = prefix if relative == Path() else join(prefix, relative.as_posix())
        return StorageError(f"{uri}: cannot list: {error.strerror or error}{note}")

    def fail(error: OSError) -> NoReturn:
        raise unlisted(error.filename or str(root), error) from error

    found: list[tuple[Path, os.stat_result]] = []
    for folder, _, names in os.walk(root, onerror=fail):
        for name in names:
            path = Path(folder, name)
            try:
                info = path.stat()
            except OSError as error:
                note = " (a broken symbolic link)" if path.is_symlink() else ""
                raise unlisted(str(path), error, note) from error
            if stat.S_ISREG(info.st_mode):
                found.append((path.relative_to(root), info))
    # By path components (a/b before a-c), the order that sources and their shards rely on.
    for relative, info in sorted(found, key=lambda entry: entry[0]):
        uri = join(prefix, relative.as_posix())
        yield FileInfo(uri=uri, size=info.st_size, etag=str(info.st_mtime_ns))


def exists(uri: str) -> bool:
    """Whether a file (object) exists at ``uri``."""
    if is_s3(uri):
        return s3.head(uri) is not None
    return local_path(uri).is_file()


def delete(uri: str) -> None:
    """Deletes the file (object) at ``uri``; deleting what does not exist is not an error."""
    if is_s3(uri):
        s3.delete(uri)
    else:
        local_path(uri).unlink(missing_ok=True)


def delete_folder(prefix: str) -> None:
    """Deletes every file (object) under the folder ``prefix``, and locally the folder itself.

    Deleting a folder that does not exist is not an error.
    """
    if is_s3(prefix):
        # Listed in full first: deleting while paginating must not disturb the listing.
        for info in list(s3.list_objects(prefix)):
            s3.delete(info.uri)
        return
    path = local_path(prefix)
    if path.is_dir():
        shutil.rmtree(path)


def size(uri: str) -> int:
    """Size of the file (object) at ``uri`` in bytes.

    Raises:
        FileNotFoundError: Nothing exists at ``uri``.
    """
    return file_info(uri).size


def file_info(uri: str) -> FileInfo:
    """The size and version tag of the file (object) at ``uri``, as :func:`list_files` gives.

    The tag (S3's ETag, a local file's mtime in nanoseconds) changes whenever the object is
    written again, so an unchanged tag vouches for unchanged bytes without reading them.

    Raises:
        FileNotFoundError: Nothing exists at ``uri``.
    """
    if not is_s3(uri):
        info = _existing_file(uri).stat()
        return FileInfo(uri=uri, size=info.st_size, etag=str(info.st_mtime_ns))
    found = s3.head(uri)
    if found is None:
        raise FileNotFoundError(f"{uri}: no such object")
    return found


def open_read(uri: str, etag: str | None = None) -> BinaryIO:
    """Opens ``uri`` for a streaming, buffered binary read; nothing is downloaded up front.

    On S3 a connection that breaks mid-object is re-opened at the current offset with a
    ranged GET, so a days-long training run survives a flaky network.

    Args:
        uri: The file (object).
        etag: The version tag :func:`list_files` gave it, to read that version only: S3
            sends it as ``If-Match``; locally the open file's mtime must still be it.

    Raises:
        FileNotFoundError: Nothing exists at ``uri``.
        ObjectChangedError: ``etag`` was given and ``uri`` holds another version now.
    """
    if is_s3(uri):
        return io.BufferedReader(s3.S3RangeReader(uri, etag), buffer_size=1024 * 1024)
    stream = _existing_file(uri).open("rb")
    if etag is not None:
        try:
            _require_local_version(uri, stream, etag)
        except ObjectChangedError:
            stream.close()
            raise
    return stream


def _require_local_version(uri: str, stream: BinaryIO, etag: str) -> None:
    """Checks that the open file still has the mtime that :func:`_list_local` recorded.

    The open file's own status, not the path's: a file replaced by a rename after the open
    still reads as the listed version, which is what was asked for.
    """
    found = str(os.fstat(stream.fileno()).st_mtime_ns)
    if found != etag:
        raise ObjectChangedError.listed_as(uri, etag, found)


def sha256(uri: str) -> str:
    """The sha256 (hex) of the file (object) at ``uri``, streamed rather than read whole.

    Raises:
        FileNotFoundError: Nothing exists at ``uri``.
    """
    with open_read(uri) as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def read_bytes(uri: str, etag: str | None = None) -> bytes:
    """Reads the whole file (object) at ``uri``.

    Args:
        uri: The file (object).
        etag: The version tag :func:`list_files` gave it, to read that version only (see
            :func:`open_read`). Locally it is checked again after the read, which catches
            a file rewritten in place while it was read.

    Raises:
        FileNotFoundError: Nothing exists at ``uri``.
        ObjectChangedError: ``etag`` was given and ``uri`` holds another version now.
    """
    with open_read(uri, etag) as stream:
        data = stream.read()
        if etag is not None and not is_s3(uri):
            _require_local_version(uri, stream, etag)
        return data


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
            s3.upload(spool, uri)
        return
    path = local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f"{_TEMPORARY_PREFIX}{path.name}.", suffix=_TEMPORARY_SUFFIX, dir=path.parent
    )
    try:
        with os.fdopen(fd, "wb") as stream:
            yield stream
            # Durable before visible: after a power loss the name holds the whole file or the
            # old one, never a short file that a reader would take for complete.
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.replace(tmp_name, path)
        _fsync_folder(path.parent)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def remove_leftover_temporaries(folder: str) -> list[str]:
    """Deletes the temporary files that killed atomic writes left in a local folder.

    A process killed mid-write cannot remove its temporary file; the next run of the step
    that owns the folder does. Object storage keeps no such files (uploads are spooled
    locally), so this does nothing on S3.

    Returns:
        The names removed.
    """
    if is_s3(folder) or not local_path(folder).is_dir():
        return []
    removed = []
    for leftover in local_path(folder).glob(f"{_TEMPORARY_PREFIX}*{_TEMPORARY_SUFFIX}"):
        leftover.unlink(missing_ok=True)
        removed.append(leftover.name)
    return removed


def _fsync_folder(folder: Path) -> None:
    # The rename itself is durable only once the folder's entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
