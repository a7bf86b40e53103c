"""The S3 half of storage: clients, listing, object operations and resumable reads.

S3 endpoints other than AWS are chosen with ``AWS_ENDPOINT_URL`` (read by boto3 itself) or
:func:`set_s3_endpoint`. Credentials come from the usual boto3 chain (environment, Secrets
mounted as env, instance roles); nothing here ever handles them.

A long training run reads thousands of shards over days; a connection reset mid-object must
not kill it. :class:`S3RangeReader` tracks its offset and re-opens the object with a ranged
GET from there, pinned to the object's ETag so that a concurrent overwrite fails loudly
instead of splicing two versions together.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

from ladder_siam.io.uri import S3_SCHEME, FileInfo, ObjectChangedError, StorageError, split_s3

if TYPE_CHECKING:
    from botocore.client import BaseClient

# Parts of 64 MiB keep a 1 GiB shard at 16 parts; S3 allows 10,000 parts of at least 5 MiB.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 64 * 1024 * 1024
# The environment variables a credentials Secret provides (k8s/base/s3-credentials.env.example).
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)


def set_s3_endpoint(url: str | None) -> None:
    """Points every S3 client (in this process and its children) at ``url`` (MinIO, SeaweedFS).

    It is set through ``AWS_ENDPOINT_URL`` rather than a module variable so that worker
    processes started later inherit it.
    """
    if url:
        os.environ["AWS_ENDPOINT_URL"] = url
        _clients.clear()


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
        session = boto3.session.Session()
        # An empty AWS_DEFAULT_REGION (a blank line in the Secret) would make boto3 call
        # https://s3..amazonaws.com and fail with an unreadable connection error.
        if not os.environ.get("AWS_ENDPOINT_URL") and not session.region_name:
            raise StorageError(
                "S3: no endpoint and no region configured; set AWS_DEFAULT_REGION for AWS S3, "
                "or AWS_ENDPOINT_URL (--s3-endpoint) for MinIO, SeaweedFS and the like"
            )
        client = session.client("s3", config=config)
        _clients[key] = client
    return client


def _client_error_code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


def not_found(error: Exception) -> bool:
    """Whether a botocore error means that the object or bucket does not exist."""
    return _client_error_code(error) in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def list_objects(prefix: str) -> Iterator[FileInfo]:
    """Every object under the folder ``prefix``, in key order (folder placeholders left out)."""
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


def head(uri: str) -> FileInfo | None:
    """The size and ETag of the object at ``uri``, or None when it does not exist."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    try:
        found = s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if not_found(error):
            return None
        raise StorageError(f"{uri}: {error}") from error
    except BotoCoreError as error:  # unreachable endpoint, after the retries
        raise StorageError(f"{uri}: {error}") from error
    return FileInfo(uri=uri, size=int(found["ContentLength"]), etag=found["ETag"].strip('"'))


def delete(uri: str) -> None:
    """Deletes the object at ``uri``; deleting what does not exist is not an error."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    try:
        s3_client().delete_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as error:
        raise StorageError(f"{uri}: cannot delete: {error}") from error


def upload(stream: BinaryIO, uri: str) -> None:
    """Uploads ``stream`` to ``uri``, in parts when large; S3 shows it only once complete."""
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


# A streaming read that breaks mid-object resumes from its offset this many times.
READ_RESUME_ATTEMPTS = 5


class S3RangeReader(io.RawIOBase):
    """A raw stream over one S3 object that re-opens broken connections at its offset.

    Args:
        uri: The object.
        etag: The ETag it was listed with; the read then fails with
            :class:`ObjectChangedError` if the object is another version now.
    """

    def __init__(self, uri: str, etag: str | None = None) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.offset = 0
        pinned = {} if etag is None else {"IfMatch": f'"{etag}"'}
        try:
            response = s3_client().get_object(Bucket=self.bucket, Key=self.key, **pinned)
        except ClientError as error:
            if not_found(error):
                raise FileNotFoundError(f"{uri}: no such object") from error
            if etag is not None and _client_error_code(error) in {"412", "PreconditionFailed"}:
                raise ObjectChangedError.listed_as(uri, etag, self._current_etag()) from error
            raise StorageError(f"{uri}: {error}") from error
        except BotoCoreError as error:  # unreachable endpoint, after the retries
            raise StorageError(f"{uri}: {error}") from error
        self.length = int(response["ContentLength"])
        self.etag = response.get("ETag")
        self.body = response["Body"]
        # Also checked by hand, for S3-compatible servers that ignore If-Match.
        found = str(self.etag or "").strip('"')
        if etag is not None and found != etag:
            self.body.close()
            raise ObjectChangedError.listed_as(uri, etag, found)

    def _current_etag(self) -> str | None:
        """The object's ETag now, for the error message; None when even that fails."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = s3_client().head_object(Bucket=self.bucket, Key=self.key)
        except (ClientError, BotoCoreError):
            return None
        return str(head.get("ETag", "")).strip('"')

    def readable(self) -> bool:
        """Always readable."""
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        """Reads into ``buffer``, re-opening the object at the offset if the connection broke."""
        from botocore.exceptions import BotoCoreError, ClientError
        from urllib3.exceptions import HTTPError

        if self.offset >= self.length:
            return 0
        for attempt in range(READ_RESUME_ATTEMPTS + 1):
            try:
                data = self.body.read(len(buffer))
                if not data:
                    raise StorageError(f"{self.uri}: stream ended at byte {self.offset}")
                break
            except (HTTPError, BotoCoreError, OSError) as error:
                if attempt == READ_RESUME_ATTEMPTS:
                    raise StorageError(f"{self.uri}: read failed at byte {self.offset}") from error
                try:
                    # IfMatch makes a resumed read fail rather than splice two object versions.
                    self.body = s3_client().get_object(
                        Bucket=self.bucket,
                        Key=self.key,
                        Range=f"bytes={self.offset}-",
                        IfMatch=self.etag,
                    )["Body"]
                except (ClientError, BotoCoreError) as reopen_error:
                    raise StorageError(
                        f"{self.uri}: cannot resume the read at byte {self.offset}: {reopen_error}"
                    ) from reopen_error
        buffer[: len(data)] = data
        self.offset += len(data)
        return len(data)

    def close(self) -> None:
        """Closes the HTTP body."""
        if not self.closed:
            self.body.close()
        super().close()
