"""Config dataclasses to flags: types from annotations, presets not overridden by defaults."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from ladder_siam.runtime.flags import add_config_flags, explicit_flags


@dataclass
class Example:
    batch_size: int = 8
    warmup: float = 1.0
    sync_bn: bool = False
    max_steps: int | None = None
    anchors: tuple[int, ...] = (32, 64)
    precision: str = "bf16"
    stages: list[str] | None = None


HELP = {name: name for name in Example.__dataclass_fields__}


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(exit_on_error=False)
    add_config_flags(
        result,
        Example,
        HELP,
        parsers={"stages": lambda text: text.split(",")},
        choices={"precision": ("fp32", "bf16")},
    )
    return result


def test_flags_are_typed_from_annotations_and_field_parsers() -> None:
    argv = [
        "--batch-size", "16", "--warmup", "0.5", "--sync-bn", "yes", "--max-steps", "3",
        "--anchors", "8,16,32", "--precision", "fp32", "--stages", "res2,res5",
    ]  # fmt: skip
    args = parser().parse_args(argv)
    assert explicit_flags(args, Example) == {
        "batch_size": 16, "warmup": 0.5, "sync_bn": True, "max_steps": 3,
        "anchors": (8, 16, 32), "precision": "fp32", "stages": ["res2", "res5"],
    }  # fmt: skip


def test_unset_flags_stay_out_so_a_preset_applies() -> None:
    args = parser().parse_args(["--warmup", "2"])
    args.unrelated = "kept out too"
    assert explicit_flags(args, Example) == {"warmup": 2.0}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sync-bn", "maybe"], "'maybe': expected true or false"),
        (["--anchors", "8,x"], "'8,x': expected integers like 32,64"),
        (["--precision", "fp16"], "invalid choice: 'fp16'"),
    ],
)
def test_bad_values_are_refused_naming_the_value(argv: list[str], message: str) -> None:
    with pytest.raises(argparse.ArgumentError, match=message):
        parser().parse_args(argv)


def test_a_field_without_a_parser_is_refused_rather_than_read_as_text() -> None:
    @dataclass
    class Labels:
        names: dict[str, str] | None = None

    with pytest.raises(TypeError, match=r"Labels.names: no parser"):
        add_config_flags(argparse.ArgumentParser(), Labels, {"names": "label names"})
