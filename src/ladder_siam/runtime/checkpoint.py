"""Checkpoints of a training run: atomic, self-describing, resumed automatically.

``OUT/checkpoints/step-000123.pt`` holds everything that decides the rest of the run: the
model, the optimizer, the step and the random state, and the settings and input fingerprints
that :mod:`ladder_siam.runtime.resume` checks a rerun against. The data position follows from
the step because the loader is deterministic per (seed, epoch, batch). Files are written
atomically and loaded with ``weights_only=True``, so a checkpoint cannot run code; one that
still does not load (a disk that lost its tail) gives way to the one before it.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

from ladder_siam.io import storage
from ladder_siam.runtime.run_folder import CHECKPOINTS

logger = logging.getLogger(__name__)

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
    """The newest checkpoint of the run that loads, or None for a fresh run.

    A checkpoint that does not load is passed over with a warning naming it; an error reading
    it (a denied or failed read) is raised, so that a rerun can still resume from it.
    """
    leftovers = storage.remove_leftover_temporaries(storage.join(out, CHECKPOINTS))
    if leftovers:
        logger.warning("removed the unfinished checkpoint writes %s", ", ".join(leftovers))
    for step, uri in reversed(list_checkpoints(out)):
        data = storage.read_bytes(uri)
        try:
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
            logger.warning("%s does not load (%s); trying the checkpoint before it", uri, error)
            continue
        logger.info("resuming from %s (step %d)", uri, step)
        return Checkpoint(step=step, state=state)
    return None


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
