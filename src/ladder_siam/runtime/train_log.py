"""``train_log.jsonl``: one JSON line per logging interval, kept consistent with checkpoints.

Object storage cannot append, so the log is held in memory and the whole file is rewritten
atomically at each interval (a few MB for a long run). On resume, lines past the
checkpoint's step are dropped: the resumed run will log those steps again.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ladder_siam.io import storage
from ladder_siam.runtime.run_folder import TRAIN_LOG

logger = logging.getLogger(__name__)


class TrainLog:
    """The run's interval records, mirrored to ``OUT/train_log.jsonl``.

    Args:
        out: The run's output URI.
        resume_step: Keep only existing records up to this step (None: start afresh).
        enabled: False on ranks other than 0.
    """

    def __init__(self, out: str, resume_step: int | None, enabled: bool = True) -> None:
        self.uri = storage.join(out, TRAIN_LOG)
        self.enabled = enabled
        self.lines: list[str] = []
        if enabled and resume_step is not None and storage.exists(self.uri):
            for line in storage.read_text(self.uri).splitlines():
                if line.strip() and json.loads(line)["step"] <= resume_step:
                    self.lines.append(line)

    def append(self, record: dict[str, Any]) -> None:
        """Adds one interval's record and rewrites the file."""
        if not self.enabled:
            return
        self.lines.append(json.dumps(record, separators=(",", ":")))
        storage.write_text(self.uri, "\n".join(self.lines) + "\n")


def read_train_log(out: str) -> list[dict[str, Any]]:
    """The records of a run's ``train_log.jsonl``."""
    text = storage.read_text(storage.join(out, TRAIN_LOG))
    return [json.loads(line) for line in text.splitlines() if line.strip()]
