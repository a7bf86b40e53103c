"""Runs, params and metrics in MLflow, when the pipeline's backend tracks runs there.

KFP 2.17's backend can track runs in MLflow; it then sets ``MLFLOW_TRACKING_URI`` and
``MLFLOW_RUN_ID`` (the step's own run) in each step's container, and the launcher passes them on
to the training pods (``kube/pod.py``). With ``MLFLOW_TRACKING_URI`` set, :func:`start_run`
opens a run nested under ``MLFLOW_RUN_ID`` (a child run in the parent's experiment, tagged
``mlflow.parentRunId``), or else in ``MLFLOW_EXPERIMENT_NAME`` (created if missing), or in the
server's default experiment. Pretraining logs its resolved config as params and each
``train_log.jsonl`` record as metrics of the same names; an evaluation logs its scalars with
:func:`log_scalars`. Without the variable nothing here imports ``mlflow`` at all.

Tracking is best-effort like the Pushgateway push in ``metrics.py``: a missing client library
(``pip install ladder-siam[mlflow]``), an unreachable or refusing server cost one warning, and
the run is then dropped for good, so it never fails or slows training. Calls happen in the
caller's thread, each bounded by :data:`HTTP_DEFAULTS` (5 s, no retry) unless the environment
sets them: the client's own defaults (120 s, 7 retries with exponential backoff) would let a
dead server hold training for many minutes. A refused connection fails in milliseconds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

TRACKING_URI = "MLFLOW_TRACKING_URI"
PARENT_RUN = "MLFLOW_RUN_ID"
EXPERIMENT_NAME = "MLFLOW_EXPERIMENT_NAME"
# What the launcher may copy from its own environment into a training pod's manifest. Never a
# credential (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_PASSWORD ...): a manifest is readable by
# anyone who can read the job, so those come from a Secret, like the S3 keys.
FORWARDED_VARIABLES = (TRACKING_URI, PARENT_RUN, EXPERIMENT_NAME)
# The client's HTTP settings unless the environment sets them: a dead server costs one
# timeout, not minutes of retries (each of which urllib3 would also log as a warning).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
PARENT_TAG = "mlflow.parentRunId"
# MLflow's limits on one log_batch call and on a param's value.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
# Record fields that are not metrics: the step is each metric's step, the time its timestamp.
_NOT_METRICS = ("step", "time")


def forwarded_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The non-secret ``MLFLOW_*`` variables of ``environ`` that a training pod should get.

    Only :data:`FORWARDED_VARIABLES` are copied, and only when set and not empty; a token or
    password must reach the pod from a Secret, never through the manifest.
    """
    return {name: environ[name] for name in FORWARDED_VARIABLES if environ.get(name)}


class TrackedRun:
    """One MLflow run that logs best-effort; see the module docstring.

    Build it with :func:`start_run`. After the first failed call it drops the run: every later
    call returns at once.

    Args:
        client: An ``mlflow.tracking.MlflowClient``.
        run_id: The run to log into.
    """

    def __init__(self, client: Any, run_id: str) -> None:
        self._client: Any | None = client
        self.run_id = run_id

    @property
    def active(self) -> bool:
        """Whether the run still logs (no call has failed and it has not ended)."""
        return self._client is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Logs ``params``, each value as a string (JSON for lists and dicts), clipped to 6000."""
        from mlflow.entities import Param

        entries = [Param(str(key), _param_value(value)) for key, value in params.items()]
        for chunk in _chunks(entries, PARAMS_PER_BATCH):
            if not self._call("log params", lambda c=chunk: self._batch(params=c)):
                return

    def log_record(self, record: Mapping[str, Any]) -> None:
        """Logs a ``train_log.jsonl`` record's numbers as metrics at the record's ``step``.

        Every field but ``step`` and ``time`` becomes a metric of the same name (``time`` is
        the timestamp); fields that are not numbers are skipped.
        """
        step = int(record.get("step", 0))
        self.log_metrics(
            {key: value for key, value in record.items() if key not in _NOT_METRICS},
            step,
            record.get("time"),
        )

    def log_metrics(
        self, metrics: Mapping[str, Any], step: int = 0, timestamp: float | None = None
    ) -> None:
        """Logs the numbers among ``metrics`` at ``step``.

        Args:
            metrics: Name -> value; bools, strings and other non-numbers are skipped.
            step: The metrics' step.
            timestamp: Unix time of the values; now by default.
        """
        from mlflow.entities import Metric

        millis = int(1000 * (time.time() if timestamp is None else timestamp))
        entries = [
            Metric(key, float(value), millis, step)
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        ]
        for chunk in _chunks(entries, METRICS_PER_BATCH):
            if not self._call("log metrics", lambda c=chunk: self._batch(metrics=c)):
                return

    def end(self, failed: bool = False) -> None:
        """Ends the run as FINISHED, or FAILED when ``failed``; later calls do nothing."""
        status = "FAILED" if failed else "FINISHED"
        self._call("end the run", lambda: self._client.set_terminated(self.run_id, status))
        self._client = None

    def _batch(self, **entries: Sequence[Any]) -> None:
        self._client.log_batch(self.run_id, **entries)

    def _call(self, what: str, call: Any) -> bool:
        if self._client is None:
            return False
        try:
            call()
        # The client raises MlflowException, requests' errors or OSError depending on the
        # store; none of them may reach training.
        except Exception as error:
            self._client = None
            logger.warning(
                "MLflow: could not %s in run %s; tracking stops for this run: %s",
                what,
                self.run_id,
                _first_line(error),
            )
            return False
        return True


def start_run(
    name: str,
    params: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> TrackedRun | None:
    """Opens a run when ``MLFLOW_TRACKING_URI`` asks for one; see the module docstring.

    Args:
        name: The run's name, e.g. ``"pretrain"`` or ``"linear-probe"``.
        params: Params to log at once, e.g. ``dataclasses.asdict(config)``.
        environ: Where to read the ``MLFLOW_*`` variables.

    Returns:
        The run, or None when the variable is unset or empty (nothing is imported then), or
        when the client is missing or the server cannot open the run (one warning says why).
    """
    uri = environ.get(TRACKING_URI)
    if not uri:
        return None
    for variable, value in HTTP_DEFAULTS.items():
        # The client reads these from the process's environment at every request.
        os.environ.setdefault(variable, value)
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as error:
        logger.warning(
            "MLflow: %s is set but the client is missing (pip install ladder-siam[mlflow]); "
            "not tracking: %s",
            TRACKING_URI,
            error,
        )
        return None
    try:
        client = MlflowClient(tracking_uri=uri)
        run_id = _create_run(client, name, environ)
    except Exception as error:  # the same range as TrackedRun._call
        logger.warning("MLflow: no run opened at %s; not tracking: %s", uri, _first_line(error))
        return None
    logger.info("MLflow: tracking %s as run %s at %s", name, run_id, uri)
    run = TrackedRun(client, run_id)
    if params:
        run.log_params(params)
    return run


def log_scalars(
    name: str,
    scalars: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> bool:
    """Logs a step's results as one short run, when ``MLFLOW_TRACKING_URI`` asks for it.

    Args:
        name: The run's name, e.g. the step's ``"linear-probe"``.
        scalars: Name -> value, logged as metrics at step 0; non-numbers are skipped.
        params: Params of the run, e.g. the evaluation's config.
        environ: Where to read the ``MLFLOW_*`` variables.

    Returns:
        True when everything was logged; False when tracking is off or a call failed.
    """
    run = start_run(name, params, environ)
    if run is None:
        return False
    run.log_metrics(scalars)
    logged = run.active
    run.end()
    return logged


def _create_run(client: Any, name: str, environ: Mapping[str, str]) -> str:
    parent = environ.get(PARENT_RUN)
    tags = {}
    if parent:
        experiment_id = client.get_run(parent).info.experiment_id
        tags[PARENT_TAG] = parent
    elif environ.get(EXPERIMENT_NAME):
        experiment_id = _experiment_id(client, environ[EXPERIMENT_NAME])
    else:
        experiment_id = "0"  # MLflow's default experiment
    return client.create_run(experiment_id, tags=tags, run_name=name).info.run_id


def _experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:
        # Another arm's pod created it between the two calls.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return text[:MAX_PARAM_LENGTH]


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
