"""Launching pretraining: a PyTorchJob on Kubernetes, or the same torchrun command locally.

``run(config)`` is what a Kubeflow pipeline step calls: it submits the job, streams the
master's log into our logger, returns when the job succeeds and raises with the master's last
log lines when it fails. KFP cancels a step with SIGTERM; ``run`` then deletes the job, so a
cancelled pipeline does not leave GPU nodes busy.
"""

from __future__ import annotations

import logging
import math
import signal
import subprocess
import sys
import time
from types import FrameType
from typing import Any

from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.rest import ApiException

from ladder_siam.kube.pytorchjob import (
    API_VERSION,
    LaunchConfig,
    build_pytorchjob,
    torchrun_command,
)

logger = logging.getLogger(__name__)

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "pytorchjobs"
LOG_TAIL_LINES = 50
# Overlap of successive log reads; lines already seen are dropped by their timestamp.
_LOG_OVERLAP_S = 5


class JobFailedError(RuntimeError):
    """A PyTorchJob ended in ``Failed``; the message holds the reason and the master's log."""

    def __init__(self, name: str, reason: str, message: str, log_tail: list[str]) -> None:
        self.name, self.reason, self.message, self.log_tail = name, reason, message, log_tail
        log = "\n".join(log_tail) or "(no log)"
        super().__init__(f"PyTorchJob {name} failed: {reason}: {message}\nmaster log:\n{log}")


class JobCancelledError(RuntimeError):
    """SIGTERM arrived while waiting for a PyTorchJob (the job has been deleted)."""


def _timestamp_key(stamp: str) -> tuple[str, int]:
    """Orders RFC 3339 UTC log timestamps; their nanosecond fractions vary in length."""
    seconds, _, fraction = stamp.rstrip("Z").partition(".")
    return seconds, int(fraction.ljust(9, "0")[:9] or 0)


class Launcher:
    """Submits, watches and deletes PyTorchJobs in one namespace.

    Args:
        namespace: namespace of the jobs.
        api_client: a configured client; by default the in-cluster service account, or the
            kubeconfig outside a cluster.
    """

    def __init__(self, namespace: str, api_client: client.ApiClient | None = None) -> None:
        if api_client is None:
            try:
                kube_config.load_incluster_config()
            except kube_config.ConfigException:
                kube_config.load_kube_config()
            api_client = client.ApiClient()
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self._last_log_key: tuple[str, int] | None = None
        self._last_log_read = 0.0

    def submit(self, job: dict[str, Any], gone_timeout_s: float = 120.0) -> str:
        """Creates ``job`` (a manifest from ``build_pytorchjob``) and returns its name.

        A job of that name may exist already: KFP retried this step, or the run was started
        again under its name. A running or finished job is followed, not restarted; a failed
        one is replaced, and the new one resumes training from the newest checkpoint.
        """
        name: str = job["metadata"]["name"]
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, job)
        except ApiException as error:
            if error.status != 409:
                raise
            if "Failed" not in self._conditions(name):
                logger.info("PyTorchJob %s/%s exists already: following it", self.namespace, name)
                return name
            logger.info("PyTorchJob %s/%s failed before: replacing it", self.namespace, name)
            self.delete(name)
            self._wait_until_gone(name, gone_timeout_s)
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, job)
        logger.info("submitted PyTorchJob %s/%s", self.namespace, name)
        return name

    def _conditions(self, name: str) -> dict[str, dict[str, Any]]:
        """The job's conditions that hold now (Created, Running, Succeeded, Failed ...)."""
        job = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return {
            condition["type"]: condition
            for condition in job.get("status", {}).get("conditions", [])
            if condition.get("status") == "True"
        }

    def _wait_until_gone(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, name
                )
            except ApiException as error:
                if error.status == 404:
                    return
                raise
            time.sleep(1.0)
        raise TimeoutError(f"PyTorchJob {name} was not deleted within {timeout_s:g} s")

    def delete(self, name: str) -> None:
        """Deletes the job and, in the background, its pods; a missing job is not an error."""
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy="Background"
            )
        except ApiException as error:
            if error.status != 404:
                raise
        logger.info("deleted PyTorchJob %s/%s", self.namespace, name)

    def wait(
        self, name: str, timeout_s: float, poll_s: float = 30.0, delete_on_timeout: bool = True
    ) -> None:
        """Polls the job's conditions until it succeeds, streaming the master's log meanwhile.

        Args:
            name: the job.
            timeout_s: seconds to wait (``math.inf``: no limit besides the job's own deadline).
            poll_s: seconds between polls.
            delete_on_timeout: delete the job when the wait times out.

        Raises:
            JobFailedError: the job failed; carries the reason and the master's last log lines.
            TimeoutError: the job did not finish in ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        self._last_log_key = None
        while True:
            conditions = self._conditions(name)
            self._stream_master_log(name)
            if "Succeeded" in conditions:
                logger.info("PyTorchJob %s succeeded", name)
                return
            if "Failed" in conditions:
                failed = conditions["Failed"]
                raise JobFailedError(
                    name, failed.get("reason", ""), failed.get("message", ""), self._log_tail(name)
                )
            if time.monotonic() >= deadline:
                if delete_on_timeout:
                    self.delete(name)
                raise TimeoutError(f"PyTorchJob {name} did not finish within {timeout_s:g} s")
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    def _master_pod(self, name: str) -> str | None:
        selector = (
            f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master"
        )
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return pods[0].metadata.name if pods else None

    def _stream_master_log(self, name: str) -> None:
        """Logs the master's new lines since the previous poll (none before the pod runs)."""
        try:
            pod = self._master_pod(name)
            if pod is None:
                return
            window: dict[str, int] = {"tail_lines": LOG_TAIL_LINES}
            if self._last_log_key is not None:
                elapsed = time.monotonic() - self._last_log_read
                window = {"since_seconds": math.ceil(elapsed) + _LOG_OVERLAP_S}
            text = self.core.read_namespaced_pod_log(pod, self.namespace, timestamps=True, **window)
        except ApiException as error:  # the pod is pending or gone: try again next poll
            logger.debug("no log from PyTorchJob %s yet: %s", name, error.reason)
            return
        self._last_log_read = time.monotonic()
        for line in text.splitlines():
            stamp, _, message = line.partition(" ")
            key = _timestamp_key(stamp)
            if self._last_log_key is None or key > self._last_log_key:
                self._last_log_key = key
                logger.info("[%s master] %s", name, message)

    def _log_tail(self, name: str) -> list[str]:
        try:
            pod = self._master_pod(name)
            if pod is None:
                return ["(no master pod)"]
            text = self.core.read_namespaced_pod_log(pod, self.namespace, tail_lines=LOG_TAIL_LINES)
        except ApiException as error:
            return [f"(master log unavailable: {error.status} {error.reason})"]
        return text.splitlines()


def run(
    config: LaunchConfig,
    launcher: Launcher | None = None,
    timeout_s: float | None = None,
    poll_s: float = 30.0,
) -> None:
    """Runs pretraining as a PyTorchJob and waits for it; SIGTERM deletes the job.

    Args:
        config: the launch settings.
        launcher: the API access; by default from the in-cluster config or kubeconfig.
        timeout_s: seconds to wait; by default the job's deadline plus 5 minutes, or no limit.
        poll_s: seconds between status polls.

    Raises:
        ValueError: ``config`` is invalid (before anything is submitted).
        JobFailedError: the job failed.
        JobCancelledError: SIGTERM arrived; the job was deleted.
        TimeoutError: the job did not finish in time; it was deleted.
    """
    job = build_pytorchjob(config)
    launcher = launcher or Launcher(config.namespace)
    if timeout_s is None:
        deadline = config.active_deadline_seconds
        timeout_s = math.inf if deadline is None else deadline + 300

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise JobCancelledError(f"PyTorchJob {config.name} cancelled by signal {signum}")

    # Installed before submitting: the job name is known, so a signal at any point is handled.
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        name = launcher.submit(job)
        launcher.wait(name, timeout_s, poll_s)
    except JobCancelledError:
        launcher.delete(config.name)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_local(config: LaunchConfig) -> None:
    """Runs the job's torchrun command on this machine (one node, ``gpus_per_node`` processes).

    Args:
        config: the launch settings; only the pretrain arguments and process count matter.

    Raises:
        subprocess.CalledProcessError: the training exited with an error.
    """
    command = torchrun_command(1, config.gpus_per_node, config.pretrain_argv())
    # This interpreter's torch.distributed.run is torchrun; --standalone picks a free port.
    command[:1] = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    logger.info("running %s", " ".join(command))
    subprocess.run(command, check=True)
