"""Failing loudly: non-finite losses stop the run, collapsing levels raise warnings."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the loop, the step and the values.

    Attributes:
        loop: The training loop that stopped (``pretraining``, ``detection finetune``...).
        step: The step whose loss was not finite (1-based: the steps completed with it).
        values: Each non-finite loss by name. A total that sums named parts is left out
            when a part is non-finite too: the part says where it started.
    """

    def __init__(self, loop: str, step: int, values: Mapping[str, float]) -> None:
        named = ", ".join(f"{name} = {value}" for name, value in values.items())
        super().__init__(f"{loop}: non-finite loss in step {step}: {named}")
        self.loop = loop
        self.step = step
        self.values = dict(values)


class FiniteCheck:
    """Collects each step's losses on the device and checks them all once per interval.

    Reading a loss on the host waits for the device to finish the step; a check per step
    would stall the GPU every step. The loop calls :meth:`check` where it reads the device
    anyway (each logging interval, and before a checkpoint, so none holds a NaN model): a
    non-finite loss stops the run within one interval, naming its first step.

    Args:
        loop: The loop's name, for the error message.
        total: The name of the value that sums the others, if any: a non-finite part makes
            it non-finite too, and the error names the part, where the problem started.
    """

    def __init__(self, loop: str, total: str = "loss") -> None:
        self.loop = loop
        self.total = total
        self._pending: list[tuple[int, list[str], torch.Tensor]] = []

    def submit(self, step: int, losses: Mapping[str, torch.Tensor]) -> None:
        """Queues one step's losses (scalars); nothing is read from the device here."""
        values = torch.stack([loss.detach().float() for loss in losses.values()])
        self._pending.append((step, list(losses), values))

    def check(self) -> None:
        """Raises :class:`NonFiniteLossError` for the first queued step with a non-finite loss."""
        pending, self._pending = self._pending, []
        if not pending or bool(torch.isfinite(torch.cat([v for _, _, v in pending])).all()):
            return
        for step, names, values in pending:
            read = dict(zip(names, values.tolist(), strict=True))
            bad = {name: value for name, value in read.items() if not math.isfinite(value)}
            if bad:
                parts = {name: value for name, value in bad.items() if name != self.total}
                raise NonFiniteLossError(self.loop, step, parts or bad)


class CollapseMonitor:
    """Warns when a level's output spread stays below a threshold for several intervals.

    Args:
        threshold: Output std (see ``losses.output_std``) under which a level is collapsing.
        patience: Consecutive low intervals before the warning.
    """

    def __init__(self, threshold: float, patience: int) -> None:
        self.threshold = threshold
        self.patience = patience
        self.low_intervals: dict[str, int] = {}

    def update(self, output_std: dict[str, float], step: int) -> list[str]:
        """Records one interval; returns the levels that just crossed the patience."""
        warned = []
        for level, value in output_std.items():
            count = self.low_intervals.get(level, 0) + 1 if value < self.threshold else 0
            self.low_intervals[level] = count
            if count == self.patience:
                logger.warning(
                    "level %s looks collapsed at step %d: output std %.2e below %.2e for %d "
                    "intervals",
                    level, step, value, self.threshold, count,
                )  # fmt: skip
                warned.append(level)
        return warned
