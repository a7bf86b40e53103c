"""Storage: one interface over local paths and S3-compatible object storage.

The lowest layer; it imports nothing else of the package. :mod:`.uri` parses URIs,
:mod:`.s3` talks to S3 (clients with retries, listing, resumable ranged reads, multipart
uploads) and :mod:`.storage` is what every step calls: list, read, and write atomically,
whatever the scheme.
"""
