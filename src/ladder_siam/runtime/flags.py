"""Command-line flags for the steps' config dataclasses, built alike for every command.

Each field of a config dataclass is one flag (``batch_size`` → ``--batch-size``), typed from
the field's annotation and explained by the config's help table. Unset flags stay out of the
parsed namespace (``default=SUPPRESS``), so a preset's value applies unless a flag overrides
it: defaults < preset < explicit flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

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


def parse_int_tuple(text: str) -> tuple[int, ...]:
    """Parses comma-separated integers such as ``32,64,128``."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 32,64") from error


# Parsers by annotation (the configs use ``from __future__ import annotations``, so a field's
# type is its annotation's text); strings are read as they are, and any other annotation needs
# a parser of its field's own.
_PARSERS: dict[str, Callable[[str], Any]] = {
    "bool": parse_bool,
    "int": int,
    "int | None": int,
    "float": float,
    "tuple[int, ...]": parse_int_tuple,
}


def flag_name(field: str) -> str:
    """The flag of a config field: ``batch_size`` → ``--batch-size``."""
    return "--" + field.replace("_", "-")


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_type: type,
    help_texts: dict[str, str],
    parsers: dict[str, Callable[[str], Any]] | None = None,
    choices: dict[str, Sequence[str]] | None = None,
) -> None:
    """Adds one flag per field of the dataclass ``config_type``.

    Args:
        parser: Gets the flags.
        config_type: A dataclass whose every field has an entry in ``help_texts``.
        help_texts: Help per field name.
        parsers: Parsers for fields whose annotation alone does not say how to read them.
        choices: Allowed values per field name, for argparse to check.

    Raises:
        TypeError: A field that is not a string has no parser (a new field's type would
            otherwise be read as a string without a word).
    """
    for field in fields(config_type):
        parse = (parsers or {}).get(field.name) or _PARSERS.get(str(field.type))
        if parse is None:
            if str(field.type) not in ("str", "str | None"):
                raise TypeError(f"{config_type.__name__}.{field.name}: no parser for {field.type}")
            parse = str
        parser.add_argument(
            flag_name(field.name),
            type=parse,
            choices=(choices or {}).get(field.name),
            default=argparse.SUPPRESS,
            help=help_texts[field.name],
        )


def explicit_flags(args: argparse.Namespace, config_type: type) -> dict[str, Any]:
    """The config fields set by a flag on the command line (unset ones are absent)."""
    names = {field.name for field in fields(config_type)}
    return {name: value for name, value in vars(args).items() if name in names}
