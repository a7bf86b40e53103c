"""Checkpoints of a pretraining run: atomic, self-describing, resumed automatically.

``OUT/checkpoints/step-000123.pt`` holds everything that decides the rest of the run: the
model (online and target), the optimizer, the step and the random state. The data position
follows from the step because the loader is deterministic per (seed, epoch, batch). Files are
written atomically, so the newest checkpoint is always complete, and loaded with
``weights_only=True``, so a checkpoint cannot run code.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from ladder_siam import storage

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"step-(\d+)\.pt$")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint."""

    step: int
    state: dict[str, Any]


def checkpoint_uri(out: str, step: int) -> str:
    """Where the checkpoint of ``step`` lives."""
    return storage.join(out, CHECKPOINTS, f"step-{step:06d}.pt")


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    """(step, URI) of every checkpoint of the run, oldest first."""
    folder = storage.join(out, CHECKPOINTS)
    try:
        files = list(storage.list_files(folder))
    except storage.StorageError:
        return []
    found = [(int(m.group(1)), f.uri) for f in files if (m := _NAME.search(f.uri))]
    return sorted(found)


def save(out: str, step: int, state: dict[str, Any], keep: int) -> str:
    """Writes the checkpoint of ``step`` atomically, then prunes all but the newest ``keep``."""
    uri = checkpoint_uri(out, step)
    with storage.atomic_write(uri) as stream:
        torch.save({"step": step, **state}, stream)
    for _, old in list_checkpoints(out)[:-keep]:
        storage.delete(old)
    return uri


def load_latest(out: str, map_location: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest checkpoint of the run, or None for a fresh run."""
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        return None
    step, uri = checkpoints[-1]
    state = torch.load(
        io.BytesIO(storage.read_bytes(uri)), map_location=map_location, weights_only=True
    )
    logger.info("resuming from %s (step %d)", uri, step)
    return Checkpoint(step=step, state=state)


def check_resumable(saved: dict[str, Any], config: Any, may_change: frozenset[str]) -> None:
    """Refuses to resume when a setting that shapes the run differs from the checkpoint's.

    Args:
        saved: The checkpoint's ``config`` (a dataclass as a dict).
        config: The current run's dataclass config (with an ``out`` field).
        may_change: Settings that a resumed run may change (paths, logging, workers...).

    Raises:
        ValueError: Listing each changed setting with its old and new value.
    """
    current = dataclasses.asdict(config)
    # A setting added after the checkpoint was written counts as its default, which a new
    # setting must keep equal to the behaviour before it.
    saved = {**_field_defaults(config), **saved}
    changed = sorted(k for k in current if k not in may_change and saved.get(k) != current[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ValueError(
            f"{config.out}: cannot resume with changed settings ({details}); use a new --out"
        )


def rng_state() -> dict[str, Any]:
    """The CPU and CUDA random states of torch (the only generators training uses)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` saved."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _field_defaults(config: Any) -> dict[str, Any]:
    defaults = {}
    for field in dataclasses.fields(config):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults
