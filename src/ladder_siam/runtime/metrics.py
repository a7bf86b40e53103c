"""The trainer's Prometheus metrics, served on ``/metrics`` or pushed to a Pushgateway.

Conventions: every name starts with ``ladder_siam_``, values are in base units (seconds,
bytes), counters end in ``_total``, and no scraped series carries a run id: runs are told
apart by the pod labels that the PodMonitor adds, so series stay few however many runs there
are. Pushed groups are the exception: a Pushgateway group is replaced by the next push with the
same grouping key, so the key holds the namespace and the run, or two tenants' runs (or two
runs of one tenant) would overwrite each other's results. A group stays until it is deleted, so
the pipeline's exit handler deletes its run's groups (:func:`delete_run_groups`) once the
outcome is recorded: what remains is one outcome group per namespace and one group per dataset.

Each :class:`TrainingMetrics` owns its own registry instead of the process-wide default, so
several instances (tests, a trainer and an evaluation in one process) never collide.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    delete_from_gateway,
    push_to_gateway,
    pushadd_to_gateway,
    start_http_server,
)

from ladder_siam import __version__
from ladder_siam.errors import UsageError

logger = logging.getLogger(__name__)

PREFIX = "ladder_siam_"
LEVELS = ("res2", "res3", "res4", "res5")
TOTAL = "total"
# The embedding a RankMe gauge measures: a stage's pooled backbone features, or the output of
# that level's projector.
SPACES = ("backbone", "projector")
# Seconds to wait for the Pushgateway, as prometheus_client's pushes do.
GATEWAY_TIMEOUT_S = 30.0
# Steps take 0.05–5 s from a laptop CPU to a multi-node GPU job; the outer buckets catch
# stalls (a slow shard, a checkpoint written in the step).
STEP_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 30.0)


class TrainingMetrics:
    """The pretraining metrics of one process, in a registry of their own.

    Args:
        method: The ladder method string, e.g. ``"DDGG"`` (a low-cardinality build label).
        arch: The backbone, e.g. ``"resnet50"``.
        levels: The ladder levels that carry a loss; ``"total"`` is added for the sum.

    Attributes:
        levels: The ladder levels, as given.
        registry: The registry that holds every metric of this instance.
    """

    def __init__(self, method: str, arch: str, levels: Iterable[str] = LEVELS) -> None:
        self.levels = tuple(levels)
        self.registry = CollectorRegistry()
        self._server: WSGIServer | None = None
        self._steps = self._counter("train_steps", "Optimizer steps.")
        self._samples = self._counter("train_samples", "Images trained on.")
        self._loss = self._gauge("train_loss", "Loss of the last interval.", "level")
        self._learning_rate = self._gauge("learning_rate", "Learning rate.")
        self._ema_tau = self._gauge("ema_tau", "EMA rate τ of the target network.")
        self._step_duration = Histogram(
            f"{PREFIX}train_step_duration_seconds",
            "Wall time of one step, data wait included.",
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self._data_wait = self._counter("data_wait_seconds", "Time steps waited for the loader.")
        self._output_std = self._gauge(
            "output_std",
            "Std across the batch of the normalised projection outputs; near 0 means collapse.",
            "level",
        )
        self._collapse_warnings = self._counter("collapse_warnings", "Collapse warnings.", "level")
        self._nonfinite_loss = self._counter(
            "nonfinite_loss", "Steps with a NaN or inf loss.", "level"
        )
        self._last_step = self._gauge("last_step_timestamp_seconds", "Unix time of the last step.")
        self._epoch = self._gauge("epoch", "Current epoch.")
        # A device label, so that without CUDA the series are absent rather than a false 0.
        self._gpu_allocated = self._gauge(
            "gpu_memory_allocated_bytes", "GPU memory held by tensors.", "device"
        )
        self._gpu_max_allocated = self._gauge(
            "gpu_memory_max_allocated_bytes", "Peak GPU memory held by tensors.", "device"
        )
        self._images_per_second = self._gauge(
            "images_per_second", "Throughput of the last interval."
        )
        # No zero-valued series for the monitor: 0 would read as a collapse (and alert) before
        # the first measurement.
        self._online_probe_top1 = self._gauge(
            "online_probe_top1",
            "Online linear probe top-1 (%) on each batch before training on it, last interval.",
            "level",
        )
        self._rankme = self._gauge(
            "rankme",
            "RankMe (effective rank, Garrido et al. 2023) of a level's pooled backbone features "
            "(space=backbone) or projector output (space=projector); near 1 means collapse.",
            "level",
            "space",
        )
        Info(
            f"{PREFIX}build", "Package version and run configuration.", registry=self.registry
        ).info({"version": __version__, "method": method, "arch": arch})
        # Zero-valued series from the start, so rate() and alerts see the first increment.
        for name in (*self.levels, TOTAL):
            self._nonfinite_loss.labels(name)
        for name in self.levels:
            self._collapse_warnings.labels(name)

    def record_step(self, batch_size: int, duration_s: float, data_wait_s: float) -> None:
        """Counts one optimizer step.

        Args:
            batch_size: Images in the step's batch (on this process).
            duration_s: Wall time of the whole step, data wait included.
            data_wait_s: Part of it spent waiting for the loader.
        """
        self._steps.inc()
        self._samples.inc(batch_size)
        self._step_duration.observe(duration_s)
        self._data_wait.inc(data_wait_s)
        self._last_step.set_to_current_time()

    def record_interval(
        self,
        losses: Mapping[str, float],
        output_std: Mapping[str, float],
        lr: float,
        tau: float,
        images_per_second: float,
        epoch: int,
    ) -> None:
        """Sets the gauges at the end of a logging interval, GPU memory included.

        Args:
            losses: Loss per level, and under ``"total"`` their sum.
            output_std: Output spread per level (the collapse signal).
            lr: Current learning rate.
            tau: Current EMA rate.
            images_per_second: Throughput over the interval.
            epoch: Current epoch.
        """
        for name, value in losses.items():
            self._loss.labels(self._level(name, allow_total=True)).set(value)
        for name, value in output_std.items():
            self._output_std.labels(self._level(name)).set(value)
        self._learning_rate.set(lr)
        self._ema_tau.set(tau)
        self._images_per_second.set(images_per_second)
        self._epoch.set(epoch)
        self.record_gpu_memory()

    def record_monitor(
        self,
        probe_top1: Mapping[str, float],
        rankme: Mapping[str, float],
        projector_rankme: Mapping[str, float],
    ) -> None:
        """Sets the online monitor's gauges (``pretrain/monitor.py``) for one interval.

        Args:
            probe_top1: Level -> online probe top-1 in percent.
            rankme: Level -> RankMe of the pooled backbone features; only the levels
                measured in the interval.
            projector_rankme: Level -> RankMe of the level's projector output, likewise.
        """
        for name, value in probe_top1.items():
            self._online_probe_top1.labels(self._level(name)).set(value)
        for space, values in zip(SPACES, (rankme, projector_rankme), strict=True):
            for name, value in values.items():
                self._rankme.labels(self._level(name), space).set(value)

    def record_nonfinite(self, level: str) -> None:
        """Counts a NaN or inf loss at ``level`` (a ladder level or ``"total"``)."""
        self._nonfinite_loss.labels(self._level(level, allow_total=True)).inc()

    def record_collapse_warning(self, level: str) -> None:
        """Counts a collapse warning at a ladder level."""
        self._collapse_warnings.labels(self._level(level)).inc()

    def record_gpu_memory(self) -> None:
        """Sets the GPU memory gauges for the current CUDA device; does nothing without CUDA."""
        # Imported here: prepare-shards imports this module and must not pay for torch.
        import torch

        if not torch.cuda.is_available():
            return
        device = str(torch.cuda.current_device())
        self._gpu_allocated.labels(device).set(torch.cuda.memory_allocated())
        self._gpu_max_allocated.labels(device).set(torch.cuda.max_memory_allocated())

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serves ``/metrics`` from a daemon thread until :meth:`close` or the process ends.

        Args:
            port: TCP port (the pod's container port named ``metrics``).
            addr: Address to bind.

        Raises:
            ValueError: The port cannot be bound (in use, or not a port).
        """
        try:
            self._server, _ = start_http_server(port, addr, registry=self.registry)
        except (OSError, OverflowError) as error:
            raise UsageError(
                f"--metrics-port {port}: cannot serve metrics there ({error}); choose another "
                "port, or 0 to turn metrics off"
            ) from error

    def close(self) -> None:
        """Stops serving ``/metrics``, if it was served."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def push(
        self,
        job: str,
        run: str,
        gateway: str | None = None,
        grouping: Mapping[str, str] | None = None,
    ) -> bool:
        """Pushes every metric to a Pushgateway, replacing the group's previous push.

        Args:
            job: The Pushgateway ``job`` label, e.g. ``"pretrain"``.
            run: The run the metrics belong to (see :func:`grouping_key`).
            gateway: Pushgateway address; defaults to ``$PUSHGATEWAY_URL``.
            grouping: Further grouping labels; low-cardinality ones only.

        Returns:
            True when pushed; False when no gateway is configured or reachable.
        """
        return _push(self.registry, job, grouping_key(run, grouping), gateway)

    def _counter(self, name: str, documentation: str, *labels: str) -> Counter:
        return Counter(f"{PREFIX}{name}", documentation, labels, registry=self.registry)

    def _gauge(self, name: str, documentation: str, *labels: str) -> Gauge:
        return Gauge(f"{PREFIX}{name}", documentation, labels, registry=self.registry)

    def _level(self, name: str, allow_total: bool = False) -> str:
        # A typo must not become a new series: unknown levels fail loudly instead.
        if name in self.levels or (allow_total and name == TOTAL):
            return name
        raise ValueError(f"unknown level {name!r}; expected one of {self.levels}")


def grouping_key(run: str | None, labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """The Pushgateway grouping key of a push: the namespace, the run, and ``labels``.

    The namespace is ``$POD_NAMESPACE`` (the pipeline sets it on every step from the pod's
    own); outside Kubernetes there is none.

    Args:
        run: The run the metrics belong to: its name, or for a dataset-preparing step the
            dataset's folder, which several runs share. None for a namespace-wide value that
            each run replaces, such as the latest pipeline outcome that alerts watch.
        labels: Further low-cardinality grouping labels (a layout, a split).
    """
    key = {**({"run": run} if run is not None else {}), **(labels or {})}
    namespace = os.environ.get("POD_NAMESPACE")
    if namespace:
        key["namespace"] = namespace
    return key


def push_job_metrics(
    job: str,
    values: Mapping[str, float],
    run: str | None,
    gateway: str | None = None,
    grouping: Mapping[str, str] | None = None,
    success: bool = True,
) -> bool:
    """Pushes the results of a short batch step (prepare-shards, an evaluation) as gauges.

    Each value becomes a gauge ``ladder_siam_<name>``; the push also sets
    ``ladder_siam_job_last_success_timestamp_seconds`` (or ``..._last_failure_...`` when
    ``success`` is False), the series that "has it run lately?" alerts watch.

    Args:
        job: The Pushgateway ``job`` label, e.g. ``"prepare-shards"``.
        values: Gauge name without the prefix (in base units) to value, e.g.
            ``{"shards_written": 12}``.
        run: The run the values belong to (see :func:`grouping_key`).
        gateway: Pushgateway address; defaults to ``$PUSHGATEWAY_URL``.
        grouping: Further grouping labels; low-cardinality ones only.
        success: Whether the step succeeded.

    Returns:
        True when pushed; False when no gateway is configured or it cannot be reached (a
        warning says so: metrics never fail a step whose work is done).
    """
    registry = CollectorRegistry()
    for name, value in values.items():
        # The help names no job: the Pushgateway shows one help per name, whichever came first.
        gauge = Gauge(
            f"{PREFIX}{name}", "Pushed by a batch step that succeeded.", registry=registry
        )
        gauge.set(value)
    outcome = "success" if success else "failure"
    Gauge(
        f"{PREFIX}job_last_{outcome}_timestamp_seconds",
        f"Unix time the job last ended in {outcome}.",
        registry=registry,
    ).set(time.time())
    return _push(registry, job, grouping_key(run, grouping), gateway, replace=success)


def _push(
    registry: CollectorRegistry,
    job: str,
    grouping: Mapping[str, str],
    gateway: str | None,
    replace: bool = True,
) -> bool:
    address = gateway or os.environ.get("PUSHGATEWAY_URL")
    if not address:
        return False
    # A success replaces the group's series; a failure only adds its own, so the last
    # success's timestamp survives for "has not succeeded in N days" alerts.
    push = push_to_gateway if replace else pushadd_to_gateway
    try:
        push(address, job, registry, grouping_key=dict(grouping))
    except OSError as error:  # refused, timed out, or an HTTP error status
        logger.warning("metrics of %s not pushed to %s: %s", job, address, error)
        return False
    return True


def delete_run_groups(run: str, namespace: str | None = None, gateway: str | None = None) -> int:
    """Deletes a finished run's groups from the Pushgateway, best-effort.

    A group is the run's when its ``run`` label (see :func:`grouping_key`) is ``run`` or one
    of its arms (``<run>/<arm>``) and its namespace is this one. Groups without a run (the
    namespace's pipeline outcome) and the groups of datasets, which runs share, are kept.

    Args:
        run: The run's name.
        namespace: The namespace whose groups are deleted; defaults to ``$POD_NAMESPACE``.
            Without one, only groups without a namespace label are the run's.
        gateway: Pushgateway address; defaults to ``$PUSHGATEWAY_URL``.

    Returns:
        How many groups were deleted; 0 when no gateway is configured. An unreachable gateway
        costs a warning, never an exception: cleaning up never fails the step that asks.
    """
    address = gateway or os.environ.get("PUSHGATEWAY_URL")
    if not address:
        return 0
    namespace = namespace or os.environ.get("POD_NAMESPACE")
    deleted = 0
    try:
        for labels in _pushed_groups(address):
            group_run = labels.get("run", "")
            if labels.get("namespace") != namespace or not (
                group_run == run or group_run.startswith(f"{run}/")
            ):
                continue
            job = labels.pop("job")
            delete_from_gateway(address, job, grouping_key=labels, timeout=GATEWAY_TIMEOUT_S)
            deleted += 1
    # OSError: refused, timed out, or an HTTP error status; ValueError: something that is not
    # a Pushgateway answered the listing.
    except (OSError, ValueError) as error:
        logger.warning(
            "groups of run %s not deleted from %s (%d deleted): %s", run, address, deleted, error
        )
    return deleted


def _pushed_groups(address: str) -> list[dict[str, str]]:
    """The grouping labels (``job`` included) of every group the Pushgateway holds."""
    # prometheus_client's pushes take a bare host:port; so does this listing.
    if urllib.parse.urlparse(address).scheme not in ("http", "https"):
        address = f"http://{address}"
    url = f"{address.rstrip('/')}/api/v1/metrics"
    with urllib.request.urlopen(url, timeout=GATEWAY_TIMEOUT_S) as response:
        body = json.load(response)
    return [dict(group["labels"]) for group in body["data"]]
