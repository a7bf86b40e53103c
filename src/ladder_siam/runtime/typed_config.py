"""Config dataclasses back from JSON, with every value checked against its field's type.

Settings cross process boundaries as JSON: from ``check-inputs`` to the launcher and the
training pods through KFP (whose protobuf ``Struct`` turns every number into a float and every
tuple into a list), and from YAML presets into a run. :func:`config_from_dict` rebuilds the
typed dataclass from such a dict: integers written as ``2.0`` become ``2``, lists become
tuples where the field is a tuple, and anything else that does not fit its field (``epochs:
"two"``, an unknown key) is refused with a message naming the source and the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from ladder_siam.errors import UsageError

T = TypeVar("T")


def config_from_dict(config_type: type[T], data: Mapping[str, Any], source: str) -> T:
    """Builds ``config_type`` from ``data``; fields missing from ``data`` keep their defaults.

    Args:
        config_type: A dataclass.
        data: Field name -> value, as JSON or YAML decoded it.
        source: Names where ``data`` came from (a file, a parameter) in error messages.

    Raises:
        UsageError: An unknown key, or a value that does not fit its field's type.
    """
    return config_type(**check_fields(config_type, data, source))


def check_fields(config_type: type, data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``data`` with each value converted to its field's type (see :func:`config_from_dict`).

    Raises:
        UsageError: An unknown key, or a value that does not fit its field's type.
    """
    hints = typing.get_type_hints(config_type)
    names = [field.name for field in dataclasses.fields(config_type)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise UsageError(f"{source}: unknown settings {', '.join(unknown)}")
    return {name: _convert(value, hints[name], f"{source}: {name}") for name, value in data.items()}


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _convert(value, option, where)
            except ValueError:
                continue
        raise UsageError(f"{where}: {value!r} is not {_describe(hint)}")
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return config_from_dict(hint, value, where)  # type: ignore[arg-type]
    if origin in (list, tuple) and isinstance(value, list | tuple):
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict and isinstance(value, Mapping):
        key_type, value_type = args or (Any, Any)
        return {
            _convert(k, key_type, where): _convert(v, value_type, f"{where}.{k}")
            for k, v in value.items()
        }
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if hint is bool and isinstance(value, bool):
        return value
    # KFP's protobuf Struct carries every number as a float: 2.0 is a fine integer.
    if hint is int and number and float(value).is_integer():
        return int(value)
    if hint is float and number:
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    raise UsageError(f"{where}: {value!r} is not {_describe(hint)}")


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(
            "null" if a is type(None) else _describe(a) for a in typing.get_args(hint)
        )
    if typing.get_origin(hint) in (list, tuple):
        return "a list"
    if typing.get_origin(hint) is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    return str(hint)
