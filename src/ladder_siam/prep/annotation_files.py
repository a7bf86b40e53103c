"""Reading annotation files (COCO JSON, VOC lists and class files) as users really save them.

Text is UTF-8 with or without a byte-order mark (Windows editors write one), lines end in
LF or CRLF, and a line is kept whole: ``round thing`` is one class name, not two.
A file that cannot be decoded or parsed at all fails the step with one line naming it; a read
that fails (denied, missing, a server error) raises the storage error, which fails the step
too, so that a rerun completes the work.
"""

from __future__ import annotations

import json
from typing import Any

from ladder_siam.errors import UsageError
from ladder_siam.io import storage


class AnnotationFileError(UsageError):
    """An annotation file that cannot be used at all; the message names it and says why."""


def read_text(uri: str) -> str:
    """The file's text, decoded as UTF-8 with any byte-order mark removed.

    Raises:
        AnnotationFileError: The bytes are not UTF-8.
        OSError: The file cannot be read.
    """
    data = storage.read_bytes(uri)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise AnnotationFileError(
            f"{uri}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "save it as UTF-8"
        ) from None


def read_lines(uri: str) -> list[tuple[int, str]]:
    """The file's lines as ``(line number, text)``, 1-based, surrounding whitespace removed.

    Only LF ends a line, so an exotic separator inside a name (a form feed, U+2028)
    cannot split it into two.
    """
    return [(number, line.strip()) for number, line in enumerate(read_text(uri).split("\n"), 1)]


def read_json(uri: str) -> Any:
    """The file's JSON document.

    Raises:
        AnnotationFileError: The text is not valid JSON.
    """
    text = read_text(uri)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        # ValueError also covers integers too long to convert; RecursionError, nesting that
        # only a hostile or broken file has.
        raise AnnotationFileError(f"{uri}: not valid JSON: {error}") from None
