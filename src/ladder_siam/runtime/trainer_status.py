"""Training progress in ``TrainJob.status.trainerStatus`` (Kubeflow Trainer v2.3).

With its ``TrainJobStatus`` feature gate on, Kubeflow Trainer gives each trainer pod a status
server's URL (``KUBEFLOW_TRAINER_SERVER_URL``), the path of a projected service-account token
(``KUBEFLOW_TRAINER_SERVER_TOKEN``) and the path of the CA that signed the server's certificate
(``KUBEFLOW_TRAINER_SERVER_CA_CERT``). A POST of ``{"trainerStatus": {...}}`` there puts the
progress, the estimated time left and a list of string-valued metrics into the TrainJob's
status, where ``kubectl get trainjob -o yaml`` and the Kubeflow dashboard show them.

:class:`TrainerStatus` sends them from rank 0. It is best-effort like the Pushgateway push in
``metrics.py``, and stricter still, since it runs inside the training loop: the POST happens on
a daemon thread, a refusing or unreachable server costs one warning, and nothing it does can
raise into training or hold it up. Each POST replaces the whole status, so the latest value of
every metric seen is carried into the next one: a RankMe measured every few intervals stays
visible in between. A NaN or infinite value is sent as ``nan``, ``inf`` or ``-inf`` rather
than dropped, because dropping it would leave the last finite value on show: a diverged run
must not look healthy in ``kubectl``.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import logging
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

URL_VARIABLE = "KUBEFLOW_TRAINER_SERVER_URL"
TOKEN_VARIABLE = "KUBEFLOW_TRAINER_SERVER_TOKEN"
CA_VARIABLE = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
# The status server is rate-limited (its statusServer.qps is 5 by default), and nobody reads a
# TrainJob's status more often than this.
MIN_INTERVAL_SECONDS = 30.0
SEND_TIMEOUT_SECONDS = 5.0
# The CRD's limits on trainerStatus.metrics: names are clipped, later items dropped. 256 items
# of 64-character names also keep the body under the server's 64 KiB.
MAX_METRICS = 256
MAX_NAME_LENGTH = 64
_INT32_MAX = 2**31 - 1
# train_log.jsonl field prefixes shown in the status, and the name each is shown under.
_STATUS_PREFIXES = {
    "loss": "loss",
    "std_": "std_",
    "online_probe_top1_": "probe_top1_",
    "rankme_": "rankme_",
}
_STATUS_FIELDS = ("epoch", "images_per_second")


def status_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of a ``train_log.jsonl`` record that a TrainJob's status shows.

    They are ``loss``, ``loss_<level>``, ``std_<level>``, ``probe_top1_<stage>`` (the online
    probe's top-1 in percent), ``rankme_<stage>``, ``rankme_projector_<level>``, ``epoch`` and
    ``images_per_second``; the learning rate, τ and timings stay in the file.

    Args:
        record: One interval's record (``pretrain/reporting.py``: ``interval_record``).
    """
    metrics = {name: record[name] for name in _STATUS_FIELDS if name in record}
    for key, value in record.items():
        for prefix, shown in _STATUS_PREFIXES.items():
            if key.startswith(prefix):
                metrics[shown + key.removeprefix(prefix)] = value
                break
    return metrics


class TrainerStatus:
    """Sends training progress to Kubeflow Trainer's status server; see the module docstring.

    Build it with :meth:`from_env` on rank 0, call :meth:`update` after every logging interval
    and :meth:`finish` when training ends.

    Args:
        url: The status endpoint, ``.../namespaces/<ns>/trainjobs/<name>/status``.
        token_file: File holding the bearer token, re-read at every send because the kubelet
            rotates it; None sends no token.
        ca_file: PEM file of the CA to trust; None trusts the system's CAs.
        min_interval: Seconds from one sent update to the next; updates in between only
            refresh the metrics the next one carries.
        timeout: Seconds one POST may take.
    """

    def __init__(
        self,
        url: str,
        token_file: str | None = None,
        ca_file: str | None = None,
        min_interval: float = MIN_INTERVAL_SECONDS,
        timeout: float = SEND_TIMEOUT_SECONDS,
    ) -> None:
        self.url = url
        self.token_file = token_file
        self.ca_file = ca_file
        self.min_interval = min_interval
        self.timeout = timeout
        self._metrics: dict[str, float] = {}
        self._start: tuple[float, int] | None = None  # (time, step) of the first update
        self._last_submitted: float | None = None
        self._failing = False
        self._pending: bytes | None = None  # the newest body not yet taken by the sender
        self._busy = False
        self._closing = False
        self._changed = threading.Condition()
        self._sender = threading.Thread(target=self._send_loop, name="trainer-status", daemon=True)
        self._sender.start()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TrainerStatus | None:
        """The status reporter the Trainer's variables ask for, or None outside a TrainJob.

        Args:
            environ: The environment to read ``KUBEFLOW_TRAINER_SERVER_*`` from.

        Returns:
            A started reporter, or None when ``KUBEFLOW_TRAINER_SERVER_URL`` is unset or empty
            (the TrainJobStatus gate is off, or this is no TrainJob).
        """
        url = environ.get(URL_VARIABLE)
        if not url:
            return None
        logger.info("reporting training progress to the TrainJob's status at %s", url)
        return cls(url, environ.get(TOKEN_VARIABLE) or None, environ.get(CA_VARIABLE) or None)

    def update(self, step: int, total_steps: int, metrics: Mapping[str, float]) -> None:
        """Reports progress, unless an update went out less than ``min_interval`` ago.

        Returns at once: the POST happens on the sender thread, replacing any update still
        waiting there.

        Args:
            step: Steps completed.
            total_steps: Steps of the whole run.
            metrics: Metric name -> value, e.g. :func:`status_metrics` of the interval's record.
        """
        now = time.monotonic()
        self._metrics.update(metrics)
        if self._start is None:
            self._start = (now, step)
        if self._last_submitted is not None and now - self._last_submitted < self.min_interval:
            return
        self._last_submitted = now
        self._submit(self._body(step, total_steps, now))

    def finish(self, total_steps: int, metrics: Mapping[str, float]) -> None:
        """Reports 100 % and no time left, whatever the interval, and stops the sender.

        Waits for the send in flight and then for this one, so that the final status is the
        last one the server sees; at most three times ``timeout``, as each send may take a
        little longer than its timeout (connecting, the TLS handshake and the reply each get
        one).

        Args:
            total_steps: Steps of the whole run.
            metrics: The last metrics.
        """
        self._metrics.update(metrics)
        self._submit(self._body(total_steps, total_steps, time.monotonic()))
        with self._changed:
            sent = self._changed.wait_for(
                lambda: self._pending is None and not self._busy, 3 * self.timeout
            )
        if not sent:
            logger.warning("the final progress update did not reach %s in time", self.url)
        self.close()

    def close(self) -> None:
        """Stops the sender without waiting for it.

        A send in flight ends on its own, within its timeout; an update still waiting is
        dropped.
        """
        with self._changed:
            self._closing = True
            self._pending = None
            self._changed.notify_all()
            idle = not self._busy
        if idle:  # it exits at once: join, so that no thread outlives close() needlessly
            self._sender.join()

    def _body(self, step: int, total_steps: int, now: float) -> bytes:
        named = ((name, value) for name, value in self._metrics.items() if name)
        status: dict[str, Any] = {
            "progressPercentage": 100 if step >= total_steps else max(100 * step // total_steps, 0),
            "lastUpdatedTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "metrics": [
                {"name": name[:MAX_NAME_LENGTH], "value": _format(value)}
                for name, value in itertools.islice(named, MAX_METRICS)
            ],
        }
        remaining = self._remaining_seconds(step, total_steps, now)
        if remaining is not None:  # unknown until a step has been timed: the field stays empty
            status["estimatedRemainingSeconds"] = remaining
        return json.dumps({"trainerStatus": status}).encode()

    def _remaining_seconds(self, step: int, total_steps: int, now: float) -> int | None:
        if step >= total_steps:
            return 0
        # Timed from the first update rather than from step 0, so that a resumed run's steps
        # before the restart, and the start-up before the first interval, do not count.
        if self._start is None or step <= self._start[1]:
            return None
        started, first_step = self._start
        per_step = (now - started) / (step - first_step)
        return min(round(per_step * (total_steps - step)), _INT32_MAX)

    def _submit(self, body: bytes) -> None:
        with self._changed:
            if self._closing:
                return
            self._pending = body
            self._changed.notify_all()

    def _send_loop(self) -> None:
        while True:
            with self._changed:
                while self._pending is None and not self._closing:
                    self._changed.wait()
                if self._pending is None:
                    return
                body, self._pending = self._pending, None
                self._busy = True
            try:
                self._send(body)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _send(self, body: bytes) -> None:
        try:
            headers = {"Content-Type": "application/json"}
            if self.token_file is not None:
                token = Path(self.token_file).read_text().strip()
                headers["Authorization"] = f"Bearer {token}"
            # Built at every send, like the token read, so that a renewed CA is picked up.
            context = ssl.create_default_context(cafile=self.ca_file)
            # The status server is a Service in the cluster: never through an HTTPS_PROXY.
            opener = urllib.request.build_opener(
                urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
            )
            request = urllib.request.Request(self.url, body, headers, method="POST")
            with opener.open(request, timeout=self.timeout) as reply:
                reply.read()
        # OSError covers HTTP error statuses, refusals, timeouts, TLS errors and a missing
        # token file; ValueError a malformed URL.
        except (OSError, ValueError, http.client.HTTPException) as error:
            self._report_failure(error)
            return
        if self._failing:
            logger.info("training progress reaches %s again", self.url)
            self._failing = False

    def _report_failure(self, error: Exception) -> None:
        detail = str(error)
        if isinstance(error, urllib.error.HTTPError):
            # The server's metav1.Status says why, e.g. which CRD limit a 422 broke.
            with contextlib.suppress(OSError, http.client.HTTPException):
                detail += ": " + error.read(300).decode(errors="replace")
        if self._failing:
            logger.debug("training progress not sent to %s: %s", self.url, detail)
            return
        self._failing = True
        logger.warning(
            "training progress not sent to %s (training goes on; further failures are logged "
            "at debug level): %s",
            self.url,
            detail,
        )


def _format(value: float) -> str:
    # A dozen characters at most, well inside the CRD's 64: four significant digits, but a
    # throughput in the thousands keeps its digits rather than reading 1.235e+04.
    if isinstance(value, int) and abs(value) < 10**9:
        return str(value)
    if 1e4 <= abs(value) < 1e9:
        return f"{value:.0f}"
    return f"{value:.4g}"
