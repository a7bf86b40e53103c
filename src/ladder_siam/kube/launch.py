"""Launching pretraining: a PyTorchJob or TrainJob on Kubernetes, or torchrun locally.

``run(config)`` is what a Kubeflow pipeline step calls: it submits the job, streams the rank-0
pod's log into our logger, returns when the job succeeds and raises with that pod's last log
lines when it fails. While the job is not running it logs why, once a minute (unschedulable,
image not pulled, over quota), and gives up after ``pending_timeout_minutes``. KFP cancels a
step with SIGTERM; ``run`` then deletes the job, so a cancelled pipeline leaves no GPU busy.

A retried step finds its job by name and adopts it only when the job carries this KFP run's
id (``ladder-siam/kfp-run-id``): a job of the same name from another run is an error, never
silently followed.
"""

from __future__ import annotations

import logging
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.rest import ApiException

from ladder_siam.kube import pytorchjob, trainjob
from ladder_siam.kube.launch_config import OWNER_LABEL, LaunchConfig, torchrun_command
from ladder_siam.kube.waiting import JobPendingError, PodSelector, pending_reasons

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 50
# Overlap of successive log reads; lines already seen are dropped by their timestamp.
_LOG_OVERLAP_S = 5


@dataclass(frozen=True)
class JobKind:
    """A custom resource that runs training: its API coordinates and how it reports."""

    kind: str
    api_version: str
    plural: str
    succeeded: str
    pods: PodSelector
    build: Callable[[LaunchConfig], dict[str, Any]]

    @property
    def group(self) -> str:
        """The API group, e.g. ``kubeflow.org``."""
        return self.api_version.split("/")[0]

    @property
    def version(self) -> str:
        """The API version within the group, e.g. ``v1``."""
        return self.api_version.split("/")[1]


PYTORCHJOB = JobKind(
    pytorchjob.KIND, pytorchjob.API_VERSION, "pytorchjobs", "Succeeded",
    PodSelector("training.kubeflow.org/job-name", "training.kubeflow.org/replica-type=master"),
    pytorchjob.build_pytorchjob,
)  # fmt: skip
# JobSet labels a TrainJob's pods with its name; completion index 0 of the node job is rank 0.
TRAINJOB = JobKind(
    trainjob.KIND, trainjob.API_VERSION, "trainjobs", "Complete",
    PodSelector("jobset.sigs.k8s.io/jobset-name", "batch.kubernetes.io/job-completion-index=0"),
    trainjob.build_trainjob,
)  # fmt: skip
KINDS = {"pytorchjob": PYTORCHJOB, "trainjob": TRAINJOB}


def build_job(config: LaunchConfig) -> dict[str, Any]:
    """The manifest of ``config``'s job kind (:data:`KINDS`); its builder validates first.

    Raises:
        ValueError: A setting is invalid (the message names it).
    """
    if config.backend not in KINDS:
        config.validate()  # names the unknown backend among the other checks
    return KINDS[config.backend].build(config)


class JobFailedError(RuntimeError):
    """A job ended in ``Failed``; the message holds the reason and rank 0's log."""

    def __init__(self, name: str, reason: str, message: str, log_tail: list[str]) -> None:
        self.name, self.reason, self.message, self.log_tail = name, reason, message, log_tail
        log = "\n".join(log_tail) or "(no log)"
        super().__init__(f"job {name} failed: {reason}: {message}\nrank-0 log:\n{log}")


class JobCancelledError(RuntimeError):
    """SIGTERM arrived while waiting for a job (the job has been deleted)."""


class JobConflictError(RuntimeError):
    """A job of the run's name exists but was created by another KFP run (or by hand)."""


def _timestamp_key(stamp: str) -> tuple[str, int]:
    """Orders RFC 3339 UTC log timestamps; their nanosecond fractions vary in length."""
    seconds, _, fraction = stamp.rstrip("Z").partition(".")
    return seconds, int(fraction.ljust(9, "0")[:9] or 0)


class Launcher:
    """Submits, watches and deletes training jobs of one kind in one namespace.

    Args:
        namespace: Namespace of the jobs.
        api_client: A configured client; by default the in-cluster service account, or the
            kubeconfig outside a cluster.
        kind: The job kind (:data:`PYTORCHJOB` or :data:`TRAINJOB`).
    """

    def __init__(
        self,
        namespace: str,
        api_client: client.ApiClient | None = None,
        kind: JobKind = PYTORCHJOB,
    ) -> None:
        if api_client is None:
            try:
                kube_config.load_incluster_config()
            except kube_config.ConfigException:
                kube_config.load_kube_config()
            api_client = client.ApiClient()
        self.namespace = namespace
        self.kind = kind
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self._last_log_key: tuple[str, int] | None = None
        self._last_log_read = 0.0

    def _coordinates(self) -> tuple[str, str, str, str]:
        return self.kind.group, self.kind.version, self.namespace, self.kind.plural

    def _describe(self, name: str) -> str:
        return f"{self.kind.kind} {self.namespace}/{name}"

    def submit(self, job: dict[str, Any], gone_timeout_s: float = 120.0) -> str:
        """Creates ``job`` (a manifest from :func:`build_job`) and returns its name.

        A job of that name may exist already. When it carries this job's owner (the KFP run:
        the step was retried), a running or finished one is adopted and followed, a failed one
        replaced (the new one resumes from the newest checkpoint).

        Raises:
            JobConflictError: The existing job belongs to another KFP run, or to none.
        """
        name: str = job["metadata"]["name"]
        try:
            self.custom.create_namespaced_custom_object(*self._coordinates(), job)
        except ApiException as error:
            if error.status != 409:
                raise
            existing = self._get(name)
            owner = job["metadata"]["labels"].get(OWNER_LABEL, "")
            theirs = existing["metadata"].get("labels", {}).get(OWNER_LABEL, "")
            if theirs != owner:
                raise JobConflictError(
                    f"{self._describe(name)} exists and was created by KFP run "
                    f"{theirs or '(none: by hand)'}, not by this run ({owner or '(none)'}); "
                    f"delete it (kubectl delete {self.kind.plural} -n {self.namespace} {name}) "
                    "to start this run afresh from its checkpoints, or choose another run name"
                ) from None
            if "Failed" not in _conditions(existing):
                logger.info("%s exists already: adopting it", self._describe(name))
                return name
            logger.info("%s failed before: replacing it", self._describe(name))
            self.delete(name)
            self._wait_until_gone(name, gone_timeout_s)
            self.custom.create_namespaced_custom_object(*self._coordinates(), job)
        logger.info("submitted %s", self._describe(name))
        return name

    def _get(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(*self._coordinates(), name)

    def _wait_until_gone(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self._get(name)
            except ApiException as error:
                if error.status == 404:
                    return
                raise
            time.sleep(1.0)
        raise TimeoutError(f"{self._describe(name)} was not deleted within {timeout_s:g} s")

    def delete(self, name: str) -> None:
        """Deletes the job and, in the background, its pods; a missing job is not an error."""
        try:
            self.custom.delete_namespaced_custom_object(
                *self._coordinates(), name, propagation_policy="Background"
            )
        except ApiException as error:
            if error.status != 404:
                raise
        logger.info("deleted %s", self._describe(name))

    def wait(
        self,
        name: str,
        timeout_s: float,
        poll_s: float = 30.0,
        pods: int = 1,
        pending_timeout_s: float = math.inf,
        report_every_s: float = 60.0,
    ) -> None:
        """Polls the job until it succeeds, streaming rank 0's log meanwhile.

        While fewer than ``pods`` pods run, the reasons are logged every ``report_every_s``;
        after ``pending_timeout_s`` of such waiting in a row the job is deleted.

        Args:
            name: The job.
            timeout_s: Seconds to wait (``math.inf``: no limit besides the job's own deadline).
            poll_s: Seconds between polls.
            pods: Pods the job runs (one per node).
            pending_timeout_s: Seconds the job may wait for its pods to run.
            report_every_s: Seconds between two logs of why the job waits.

        Raises:
            JobFailedError: The job failed; carries the reason and rank 0's last log lines.
            JobPendingError: The job waited for its pods too long; the message says why.
            TimeoutError: The job did not finish in ``timeout_s``; it was deleted.
        """
        deadline = time.monotonic() + timeout_s
        self._last_log_key = None
        pending_since: float | None = None
        reported = -math.inf
        while True:
            job = self._get(name)
            conditions = _conditions(job)
            self._stream_log(name)
            if self.kind.succeeded in conditions:
                logger.info("%s succeeded", self._describe(name))
                return
            if "Failed" in conditions:
                failed = conditions["Failed"]
                raise JobFailedError(
                    name, failed.get("reason", ""), failed.get("message", ""), self._log_tail(name)
                )
            now = time.monotonic()
            reasons = pending_reasons(self.core, self.namespace, job, self.kind.pods, pods)
            if not reasons:
                pending_since = None
            else:
                pending_since = now if pending_since is None else pending_since
                waited = now - pending_since
                if now - reported >= report_every_s:
                    reported = now
                    logger.warning(
                        "%s waiting %.0f min: %s", self._describe(name), waited / 60,
                        "; ".join(reasons),
                    )  # fmt: skip
                if waited >= pending_timeout_s:
                    self.delete(name)
                    raise JobPendingError(
                        f"{self._describe(name)} did not get its {pods} pods running within "
                        f"{pending_timeout_s / 60:g} min and was deleted: " + "; ".join(reasons)
                    )
            if now >= deadline:
                self.delete(name)
                raise TimeoutError(f"{self._describe(name)} did not finish within {timeout_s:g} s")
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    def _first_pod(self, name: str) -> str | None:
        selector = self.kind.pods.first(name)
        found = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return found[0].metadata.name if found else None

    def _stream_log(self, name: str) -> None:
        """Logs rank 0's new lines since the previous poll (none before the pod runs)."""
        try:
            pod = self._first_pod(name)
            if pod is None:
                return
            window: dict[str, int] = {"tail_lines": LOG_TAIL_LINES}
            if self._last_log_key is not None:
                elapsed = time.monotonic() - self._last_log_read
                window = {"since_seconds": math.ceil(elapsed) + _LOG_OVERLAP_S}
            text = self.core.read_namespaced_pod_log(pod, self.namespace, timestamps=True, **window)
        except ApiException as error:  # the pod is pending or gone: try again next poll
            logger.debug("no log from %s yet: %s", self._describe(name), error.reason)
            return
        self._last_log_read = time.monotonic()
        for line in text.splitlines():
            stamp, _, message = line.partition(" ")
            key = _timestamp_key(stamp)
            if self._last_log_key is None or key > self._last_log_key:
                self._last_log_key = key
                logger.info("[%s rank 0] %s", name, message)

    def _log_tail(self, name: str) -> list[str]:
        try:
            pod = self._first_pod(name)
            if pod is None:
                return ["(no rank-0 pod)"]
            text = self.core.read_namespaced_pod_log(pod, self.namespace, tail_lines=LOG_TAIL_LINES)
        except ApiException as error:
            return [f"(rank-0 log unavailable: {error.status} {error.reason})"]
        return text.splitlines()


def _conditions(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The job's conditions that hold now (Created, Running, Succeeded, Complete, Failed ...)."""
    return {
        condition["type"]: condition
        for condition in job.get("status", {}).get("conditions", [])
        if condition.get("status") == "True"
    }


def run(
    config: LaunchConfig,
    launcher: Launcher | None = None,
    timeout_s: float | None = None,
    poll_s: float = 30.0,
) -> None:
    """Runs pretraining as ``config.backend``'s job and waits for it; SIGTERM deletes the job.

    Args:
        config: The launch settings.
        launcher: The API access; by default from the in-cluster config or kubeconfig.
        timeout_s: Seconds to wait; by default the job's deadline plus 5 minutes, or no limit.
        poll_s: Seconds between status polls.

    Raises:
        ValueError: ``config`` is invalid (before anything is submitted).
        JobConflictError: A job of this name belongs to another run.
        JobFailedError: The job failed.
        JobPendingError: The job's pods did not run within ``config.pending_timeout_minutes``.
        JobCancelledError: SIGTERM arrived; the job was deleted.
        TimeoutError: The job did not finish in time; it was deleted.
    """
    job = build_job(config)
    launcher = launcher or Launcher(config.namespace, kind=KINDS[config.backend])
    if timeout_s is None:
        deadline = config.active_deadline_seconds
        timeout_s = math.inf if deadline is None else deadline + 300
    pending_timeout_s = config.pending_timeout_minutes * 60 or math.inf

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise JobCancelledError(f"job {config.name} cancelled by signal {signum}")

    # Installed before submitting: the job name is known, so a signal at any point is handled.
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        name = launcher.submit(job)
        launcher.wait(name, timeout_s, poll_s, config.nodes, pending_timeout_s)
    except JobCancelledError:
        launcher.delete(config.name)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_local(config: LaunchConfig) -> None:
    """Runs the job's torchrun command on this machine (one node, ``gpus_per_node`` processes).

    Args:
        config: The launch settings; only the task and its arguments, the process count and
            ``max_restarts`` matter.

    Raises:
        subprocess.CalledProcessError: The training exited with an error.
    """
    command = torchrun_command(
        1, config.gpus_per_node, config.argv(), config.max_restarts, config.task
    )
    # This interpreter's torch.distributed.run is torchrun; --standalone picks a free port.
    command[:1] = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    logger.info("running %s", " ".join(command))
    subprocess.run(command, check=True)
