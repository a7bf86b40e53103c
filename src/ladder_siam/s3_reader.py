"""A streaming read of one S3 object that survives broken connections.

A long training run reads thousands of shards over days; a connection reset mid-object must
not kill it. The reader tracks its offset and re-opens the object with a ranged GET from
there, pinned to the object's ETag so that a concurrent overwrite fails loudly instead of
splicing two versions together.
"""

from __future__ import annotations

import io

from ladder_siam.storage import StorageError, not_found, s3_client, split_s3

# A streaming read that breaks mid-object resumes from its offset this many times.
READ_RESUME_ATTEMPTS = 5


class S3RangeReader(io.RawIOBase):
    """A raw stream over one S3 object that re-opens broken connections at its offset."""

    def __init__(self, uri: str) -> None:
        from botocore.exceptions import ClientError

        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.offset = 0
        try:
            response = s3_client().get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as error:
            if not_found(error):
                raise FileNotFoundError(f"{uri}: no such object") from error
            raise StorageError(f"{uri}: {error}") from error
        self.length = int(response["ContentLength"])
        self.etag = response.get("ETag")
        self.body = response["Body"]

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
                except ClientError as reopen_error:
                    raise StorageError(f"{self.uri}: cannot resume read") from reopen_error
        buffer[: len(data)] = data
        self.offset += len(data)
        return len(data)

    def close(self) -> None:
        """Closes the HTTP body."""
        if not self.closed:
            self.body.close()
        super().close()
