"""The one exception type for a user's mistake: a bad flag, setting, file or URI.

A step raises :class:`UsageError` (or a subclass, such as ``ManifestError``) with a message
that names the input and what is wrong; the CLI prints it as one line and exits 2. Every other
exception is a bug and keeps its traceback, so that a shape mismatch deep inside torch (also a
``ValueError``) is never mistaken for bad input in KFP's or Kubernetes' logs. Storage failures
are ``OSError`` (``io.uri.StorageError``) and are reported as one line too.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A user's mistake; the message names the input and says what is wrong.

    A ``ValueError``, so that code validating with ``except ValueError`` keeps working.
    """
