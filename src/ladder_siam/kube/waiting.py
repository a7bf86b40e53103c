"""Why a training job is not running yet, in the words Kubernetes gives.

A job that waits for GPUs, an image, a quota or a queue says so only in its pods' conditions
and container states and in Events, which a pipeline user never sees. :func:`pending_reasons`
gathers them into lines such as ``Unschedulable: 0/12 nodes are available: 12 Insufficient
nvidia.com/gpu (ladder-siam-r1-master-0, ladder-siam-r1-worker-0)``, which the launcher logs
once a minute and fails with when the wait exceeds its limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubernetes import client

# Container states that are the normal way to running, not a reason to wait.
_STARTING = {"ContainerCreating", "PodInitializing"}
# Job conditions that explain a wait (Kueue suspends a job until its quota is reserved).
_WAIT_CONDITIONS = {"Suspended", "Restarting"}
# Events kept per object: the most recent few explain the present.
_EVENTS_PER_OBJECT = 3


@dataclass(frozen=True)
class PodSelector:
    """How a job kind labels its pods: all of them, and the one whose log is rank 0's."""

    job_label: str
    first_pod: str

    def all(self, name: str) -> str:
        """Label selector of every pod of job ``name``."""
        return f"{self.job_label}={name}"

    def first(self, name: str) -> str:
        """Label selector of the rank-0 pod of job ``name``."""
        return f"{self.all(name)},{self.first_pod}"


class JobPendingError(RuntimeError):
    """The job did not get all its pods running in time; it has been deleted."""


def pending_reasons(
    core: client.CoreV1Api,
    namespace: str,
    job: dict[str, Any],
    pods: PodSelector,
    expected_pods: int,
) -> list[str]:
    """Why ``job`` does not have all ``expected_pods`` pods running; empty when it does.

    Args:
        core: The core API (pods and events).
        namespace: The job's namespace.
        job: The job object as the API returned it (its status conditions are read).
        pods: How the job's pods are labelled.
        expected_pods: Pods the job runs when it runs (one per node).
    """
    name = job["metadata"]["name"]
    found = core.list_namespaced_pod(namespace, label_selector=pods.all(name)).items
    running = [pod for pod in found if pod.status and pod.status.phase in ("Running", "Succeeded")]
    if len(running) >= expected_pods:
        return []
    # (object, reason, message); a pod's Unschedulable condition and its FailedScheduling
    # event say the same thing, so each message is kept once per object.
    found_reasons: list[tuple[str, str, str]] = []
    for condition in job.get("status", {}).get("conditions", []):
        if condition.get("type") in _WAIT_CONDITIONS and condition.get("status") == "True":
            found_reasons.append(
                (name, condition["type"], condition.get("message") or condition.get("reason", ""))
            )
    for pod in found:
        found_reasons += _pod_reasons(pod)
    for involved in [name, *(pod.metadata.name for pod in found)]:
        found_reasons += _warning_events(core, namespace, involved)
    # One line per message, naming every object it concerns: eight pods that lack a GPU
    # make one line, not eight.
    by_message: dict[str, tuple[str, list[str]]] = {}
    for subject, reason, message in found_reasons:
        _, subjects = by_message.setdefault(message, (reason, []))
        if subject not in subjects:
            subjects.append(subject)
    lines = [
        f"{reason}: {message} ({', '.join(subjects)})".replace(":  (", " (")
        for message, (reason, subjects) in by_message.items()
    ]
    return [f"{len(running)}/{expected_pods} pods running", *lines]


def _pod_reasons(pod: Any) -> list[tuple[str, str, str]]:
    name, status, reasons = pod.metadata.name, pod.status, []
    if status is None:
        return reasons
    for condition in status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            reasons.append((name, condition.reason or "Unschedulable", condition.message or ""))
    for container in status.container_statuses or []:
        waiting = container.state.waiting if container.state else None
        if waiting is not None and waiting.reason not in _STARTING:
            reasons.append((name, waiting.reason or "Waiting", waiting.message or ""))
    return reasons


def _warning_events(
    core: client.CoreV1Api, namespace: str, involved: str
) -> list[tuple[str, str, str]]:
    events = core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={involved}"
    ).items
    warnings = [event for event in events if event.type == "Warning"]
    warnings.sort(key=lambda event: str(event.last_timestamp or event.event_time or ""))
    return [(involved, e.reason or "", e.message or "") for e in warnings[-_EVENTS_PER_OBJECT:]]
