"""Failing loudly: non-finite losses stop the run, collapsing levels raise warnings."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the levels and the step."""

    def __init__(self, levels: list[str], step: int) -> None:
        super().__init__(f"non-finite loss at level {', '.join(levels)} in step {step}")
        self.levels = levels
        self.step = step


class FiniteCheck:
    """Checks each step's losses for NaN/inf one step later, without stalling the GPU.

    Reading a loss on the host waits for the GPU to finish the step. Checking the previous
    step's flags instead (finished by the time the next step is queued) costs no stall and
    still stops the run within one step.
    """

    def __init__(self) -> None:
        self._pending: tuple[int, list[str], torch.Tensor] | None = None

    def submit(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        """Queues this step's losses; checks the previous step's."""
        self.check()
        flags = torch.isfinite(torch.stack([loss.detach().float() for loss in losses.values()]))
        self._pending = (step, list(losses), flags)

    def check(self) -> None:
        """Raises :class:`NonFiniteLossError` if the queued step had a non-finite loss."""
        if self._pending is None:
            return
        step, levels, flags = self._pending
        self._pending = None
        finite = flags.tolist()
        if not all(finite):
            bad = [level for level, ok in zip(levels, finite, strict=True) if not ok]
            # The total is non-finite whenever a level is; name the level when there is one.
            bad = [level for level in bad if level != "total"] or bad
            raise NonFiniteLossError(bad, step)


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
