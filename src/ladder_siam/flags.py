"""Value types for the step commands' flags, shared so every command reads them alike."""

from __future__ import annotations

import argparse

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(text: str) -> bool:
    """Parses ``true/false``, ``yes/no``, ``on/off`` or ``1/0`` (any case) for a flag.

    Raises:
        argparse.ArgumentTypeError: Anything else, so argparse names the flag.
    """
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
