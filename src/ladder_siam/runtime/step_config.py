"""What every step's config checks and how it is built from a preset: one rule, one wording.

The four step configs (pretraining, linear probe, detection, segmentation) each check their
settings before any work starts and build themselves from a preset plus overrides. The checks
they share, and the wording of each message, live here, so that one mistake reads the same in
every step: ``--workers -1: must be at least 0``, ``--batch-size 0: must be divisible by
world size 1 and at least 1``, ``--preset 'ade': expected one of voc, cityscapes, tiny, smoke``.

A config's ``validate`` lists ``(ok, message)`` pairs, built with the functions below where
they fit and written out where a rule is the config's own, and hands them to :func:`check`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, TypeVar

from ladder_siam.errors import UsageError
from ladder_siam.runtime.flags import explicit_flags, flag_name

T = TypeVar("T")
Check = tuple[bool, str]
# The forward pass's precisions (``runtime.loop.autocast``): bf16 autocast on GPUs, or none.
PRECISIONS = ("fp32", "bf16")


class StepConfig(Protocol):
    """The fields every step config has (a training loop over batches, with checkpoints)."""

    batch_size: int
    workers: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int


def check(checks: Iterable[Check]) -> None:
    """Raises on the first failed check.

    Raises:
        UsageError: The first check whose ``ok`` is false, with its message.
    """
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def expected(flag: str, value: object, choices: Iterable[str]) -> str:
    """The message for a ``value`` outside ``choices``: ``--x 'v': expected a or b``."""
    names = list(choices)
    allowed = " or ".join(names) if len(names) == 2 else f"one of {', '.join(names)}"
    return f"{flag} {value!r}: expected {allowed}"


def required(config: object, *fields: str) -> list[Check]:
    """Each of ``fields`` must be set (non-empty)."""
    return [(bool(getattr(config, name)), f"{flag_name(name)} is required") for name in fields]


def at_least(config: object, field: str, minimum: float) -> Check:
    """``config.<field>`` must be ``minimum`` or more; ``None`` (an unset optional) passes."""
    value = getattr(config, field)
    ok = value is None or value >= minimum
    return ok, f"{flag_name(field)} {value}: must be at least {minimum}"


def positive(config: object, field: str) -> Check:
    """``config.<field>`` must be above 0."""
    value = getattr(config, field)
    return value > 0, f"{flag_name(field)} {value}: must be positive"


def between(
    config: object,
    field: str,
    low: float,
    high: float,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> Check:
    """``config.<field>`` must lie between ``low`` and ``high``, ends included unless open."""
    value = getattr(config, field)
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    return above and below, f"{flag_name(field)} {value}: must be in {interval}"


def one_of(config: object, field: str, choices: Iterable[str]) -> Check:
    """``config.<field>`` must be one of ``choices``; ``None`` (an unset optional) passes."""
    value, names = getattr(config, field), list(choices)
    return value is None or value in names, expected(flag_name(field), value, names)


def _batch_size_check(
    batch_size: int,
    world_size: int,
    *,
    per_rank: int = 1,
    divisible: bool = True,
    accumulation: int | None = None,
) -> Check:
    """The global batch must give each rank ``per_rank`` samples, split evenly if ``divisible``.

    With ``accumulation`` (a config that accumulates micro-batches) it must split evenly over
    the ranks times the accumulation steps.
    """
    # A bad accumulation has its own check; dividing by it here must not fail before that.
    steps = max(accumulation or 1, 1)
    minimum = per_rank * world_size * steps
    rules = [f"at least {minimum}" + (f" ({per_rank} per rank)" if per_rank > 1 else "")]
    if divisible:
        over = f"world size {world_size}"
        if accumulation is not None:
            over += f" x accumulation {accumulation}"
        rules.insert(0, f"divisible by {over}")
    ok = batch_size >= minimum and (not divisible or batch_size % (world_size * steps) == 0)
    return ok, f"--batch-size {batch_size}: must be {' and '.join(rules)}"


def step_checks(
    config: StepConfig,
    world_size: int,
    *,
    per_rank: int = 1,
    divisible: bool = True,
    accumulation: int | None = None,
) -> list[Check]:
    """The checks every step makes: its batch over the ranks, its loader, its log, its checkpoints.

    Args:
        config: A step's config.
        world_size: Ranks the step runs on.
        per_rank: Samples each rank needs at least (2 where batch normalisation trains).
        divisible: Whether the batch must split evenly over the ranks.
        accumulation: Micro-batches per optimizer step, for a config that accumulates.
    """
    batch = _batch_size_check(
        config.batch_size,
        world_size,
        per_rank=per_rank,
        divisible=divisible,
        accumulation=accumulation,
    )
    return [
        batch,
        at_least(config, "workers", 0),
        at_least(config, "log_every", 1),
        at_least(config, "checkpoint_every", 1),
        at_least(config, "keep_checkpoints", 1),
    ]


def from_preset(
    config_type: type[T], presets: Mapping[str, Mapping[str, Any]], name: str, /, **overrides: Any
) -> T:
    """``config_type``'s defaults, then the preset ``name``'s values, then ``overrides``.

    Raises:
        UsageError: ``name`` is not in ``presets`` (the message lists those that are).
    """
    if name not in presets:
        raise UsageError(expected("--preset", name, presets))
    return config_type(**{**presets[name], **overrides})


def preset_and_overrides(
    args: argparse.Namespace, config_type: type, default: str
) -> tuple[str, dict[str, Any]]:
    """The ``--preset`` on the command line (``default`` without one) and the other flags set.

    ``--preset`` is a config field where the config records its preset, or a flag of its own.
    """
    overrides = explicit_flags(args, config_type)
    overrides.pop("preset", None)
    return getattr(args, "preset", default), overrides
