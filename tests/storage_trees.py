"""Copying a local test folder into object storage, keeping its relative paths."""

from __future__ import annotations

from pathlib import Path

from ladder_siam.io import storage


def upload_tree(local: Path, uri: str) -> None:
    """Writes every file under ``local`` to ``uri``/<its path relative to ``local``>."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes(
                storage.join(uri, path.relative_to(local).as_posix()), path.read_bytes()
            )
