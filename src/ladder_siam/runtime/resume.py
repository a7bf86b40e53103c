"""Resuming a run: the newest checkpoint that loads, and one rule for what may differ.

Every training loop (pretraining, the standard linear probe, the detection and segmentation
finetunes) resumes through :func:`resume`, so they all refuse the same things:

* a changed **setting** that shapes the result (the learning rate, the batch, the method...).
  What may change is where inputs and outputs live, how they are read, how often the run logs
  and saves, and what is computed only after training: :data:`MAY_CHANGE`, one list for
  every loop;
* a changed **input file**, compared by content: a ``backbone.pt`` re-exported at the same
  path is a different backbone, and the finetune it would resume was trained from the old
  one. The loop records the sha256 of its input files (:func:`fingerprint`) in every
  checkpoint, and :func:`resume` compares them.

The refusal names every difference at once, so one rerun fixes them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from ladder_siam.errors import UsageError
from ladder_siam.io import storage
from ladder_siam.runtime import checkpoint
from ladder_siam.runtime.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

# Settings a resumed run may change: where data and outputs live (an input's content is
# compared by fingerprint instead), how data is read, how often the run logs and saves, how
# the step is compiled, what is watched beside training without shaping it, and what is
# evaluated only after training. Any other difference from
# the checkpoint's settings would make the resumed run a different run.
MAY_CHANGE = frozenset(
    {
        # where things live
        "shards", "train", "val", "backbone", "out",
        # how data is read and the step runs
        "workers", "buffer_size", "cpu_threads", "decode", "compile",
        # how often the run reports and saves, and how long this invocation goes on
        "log_every", "checkpoint_every", "keep_checkpoints", "max_steps", "metrics_port",
        "collapse_threshold", "collapse_patience",
        # what is watched alongside training without shaping it (the online monitor)
        "online_monitor", "online_probe_lr", "rank_every",
        # what is computed only after training
        "eval_batch_size", "extract_batch_size", "cache_features", "knn_k", "knn_temperature",
        "knn_chunk",
    }
)  # fmt: skip


class Stateful(Protocol):
    """What a checkpoint saves and restores: a model, an optimizer, a set of heads."""

    def state_dict(self) -> dict[str, Any]:
        """The part's state."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any:
        """Restores what :meth:`state_dict` returned."""


class ResumeError(UsageError):
    """A checkpoint exists but belongs to a different run; the message lists every difference."""


def fingerprint(uri: str) -> str:
    """The sha256 of the file at ``uri``, read as a stream.

    Raises:
        FileNotFoundError: Nothing exists at ``uri``.
    """
    with storage.open_read(uri) as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def state(config: Any, inputs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What every checkpoint records so that :func:`resume` can check a rerun against it.

    Args:
        config: The run's dataclass config.
        inputs: Input name -> :func:`fingerprint` of the file the run trains from.
    """
    return {"config": dataclasses.asdict(config), "inputs": dict(inputs or {})}


def save(
    config: Any, step: int, parts: Mapping[str, Stateful], inputs: Mapping[str, str] | None = None
) -> str:
    """Writes the checkpoint of ``step`` under ``config.out`` and prunes the older ones.

    It holds each part's ``state_dict``, torch's random state and what :func:`resume` checks a
    rerun against (:func:`state`); ``config.keep_checkpoints`` of them are kept.

    Returns:
        The checkpoint's URI.
    """
    saved = {name: part.state_dict() for name, part in parts.items()}
    saved.update(rng=checkpoint.rng_state(), **state(config, inputs))
    uri = checkpoint.save(config.out, step, saved, config.keep_checkpoints)
    logger.info("checkpoint %s", uri)
    return uri


def restore(resumed: Checkpoint, parts: Mapping[str, Stateful]) -> None:
    """Loads each part's state and torch's random state from what :func:`save` wrote."""
    for name, part in parts.items():
        part.load_state_dict(resumed.state[name])
    checkpoint.set_rng_state(resumed.state["rng"])


def resume(
    out: str,
    config: Any,
    inputs: Mapping[str, str] | None = None,
    map_location: str | torch.device = "cpu",
) -> Checkpoint | None:
    """The newest checkpoint under ``out`` that loads, if it belongs to this run.

    Args:
        out: The run's output folder.
        config: The current run's dataclass config.
        inputs: Input name -> fingerprint of this run's input files, as given to :func:`state`.
        map_location: Where to load the tensors.

    Returns:
        The checkpoint, or None for a fresh run.

    Raises:
        ResumeError: A setting or an input differs from the checkpoint's.
    """
    resumed = checkpoint.load_latest(out, map_location=map_location)
    if resumed is None:
        return None
    differences = changed_settings(resumed.state["config"], config)
    differences += changed_inputs(resumed.state.get("inputs"), dict(inputs or {}))
    if differences:
        raise ResumeError(
            f"{out}: cannot resume from step {resumed.step}, the run differs from its "
            f"checkpoint ({'; '.join(differences)}); use a new --out"
        )
    logger.info("resuming %s from its checkpoint at step %d", out, resumed.step)
    return resumed


def changed_settings(saved: Mapping[str, Any], config: Any) -> list[str]:
    """``name: old -> new`` for each setting outside :data:`MAY_CHANGE` that differs."""
    # A setting added after the checkpoint was written counts as its default, which a new
    # setting must keep equal to the behaviour before it.
    saved = {**_field_defaults(config), **saved}
    current = dataclasses.asdict(config)
    return [
        f"{name}: {saved.get(name)!r} -> {value!r}"
        for name, value in sorted(current.items())
        if name not in MAY_CHANGE and _comparable(saved.get(name)) != _comparable(value)
    ]


def changed_inputs(saved: Mapping[str, str] | None, current: Mapping[str, str]) -> list[str]:
    """``name changed since the checkpoint (sha256 old -> new)`` for each changed input."""
    if saved is None:
        if current:
            logger.warning(
                "the checkpoint predates input fingerprints: cannot check that %s is unchanged",
                ", ".join(sorted(current)),
            )
        return []
    return [
        f"{name} changed since the checkpoint (sha256 {saved.get(name, 'none')[:12]} -> "
        f"{digest[:12]})"
        for name, digest in sorted(current.items())
        if saved.get(name) != digest
    ]


def _comparable(value: Any) -> Any:
    # A checkpoint stores tuples as lists.
    return list(value) if isinstance(value, tuple | list) else value


def _field_defaults(config: Any) -> dict[str, Any]:
    defaults = {}
    for field in dataclasses.fields(config):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults
