"""Progress reporting that suits both a terminal and a pod's log.

On a terminal a tqdm bar redraws in place. In a pod (stdout is not a TTY) redrawing would
flood ``kubectl logs`` with carriage returns, so plain log lines are written at a fixed
interval instead, each one complete in itself (done, total, rate, ETA).
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from tqdm import tqdm

LOG_INTERVAL_SECONDS = 30.0


class Progress:
    """Counts units of work and reports them; use as a context manager.

    Args:
        total: Units expected, or None when unknown.
        description: What is being counted, e.g. ``"shards"``.
        unit: The unit's name, e.g. ``"img"``.
        logger: Where plain lines go when there is no terminal.
        enabled: False on ranks other than 0, so only one process reports.
        interval: Seconds between plain log lines.
    """

    def __init__(
        self,
        total: int | None,
        description: str,
        unit: str = "it",
        logger: logging.Logger | None = None,
        enabled: bool = True,
        interval: float = LOG_INTERVAL_SECONDS,
    ) -> None:
        self.total = total
        self.description = description
        self.unit = unit
        self.logger = logger or logging.getLogger(__name__)
        self.enabled = enabled
        self.interval = interval
        self.done = 0
        self.start = time.monotonic()
        self._last_log = self.start
        use_bar = enabled and sys.stderr.isatty()
        self._bar = tqdm(total=total, desc=description, unit=unit) if use_bar else None

    def update(self, count: int = 1, **postfix: object) -> None:
        """Adds ``count`` finished units; ``postfix`` values are shown next to the count."""
        self.done += count
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(count)
            return
        now = time.monotonic()
        if self.enabled and now - self._last_log >= self.interval:
            self._last_log = now
            self.logger.info("%s%s", self.line(), _format_postfix(postfix))

    @property
    def has_bar(self) -> bool:
        """Whether a tqdm bar shows progress (else callers log their own lines)."""
        return self._bar is not None

    @property
    def rate(self) -> float:
        """Units per second since the start."""
        return self.done / max(time.monotonic() - self.start, 1e-9)

    def line(self) -> str:
        """One self-contained status line: done/total, rate and time left."""
        total = f"/{self.total}" if self.total is not None else ""
        text = f"{self.description}: {self.done}{total} {self.unit} ({self.rate:.1f} {self.unit}/s"
        if self.total and self.done:
            remaining = (self.total - self.done) / max(self.rate, 1e-9)
            text += f", {remaining:.0f} s left"
        return text + ")"

    def close(self) -> None:
        """Closes the bar, if any."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _format_postfix(postfix: dict[str, object]) -> str:
    return "".join(f" {key}={value}" for key, value in postfix.items())
