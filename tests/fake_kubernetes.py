"""A fake Kubernetes API server on loopback: just the endpoints ``ladder_siam.kube.launch`` calls.

Real HTTP and the real ``kubernetes`` client; the server plays a scripted training job (a
PyTorchJob or a TrainJob): its pods wait ``pending_polls`` status polls for a node (Pending,
unschedulable, with a ``FailedScheduling`` Event) and then run; the job turns ``Succeeded``
(``Complete`` for a TrainJob) or ``Failed`` after ``after_polls`` polls, or never; and its
rank-0 pod's log grows by one line per poll.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from kubernetes import client

JOBS = re.compile(
    r"/apis/(kubeflow\.org/v1|trainer\.kubeflow\.org/v1alpha1)/namespaces/([^/]+)/"
    r"(pytorchjobs|trainjobs)(?:/([^/]+))?"
)
PODS = re.compile(r"/api/v1/namespaces/([^/]+)/pods")
POD_LOG = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log")
EVENTS = re.compile(r"/api/v1/namespaces/([^/]+)/events")
UNSCHEDULABLE = "0/12 nodes are available: 12 Insufficient nvidia.com/gpu."


@dataclass
class Script:
    """How the job behaves: ``outcome`` ("Succeeded", "Failed" or None: runs forever)."""

    outcome: str | None = "Succeeded"
    after_polls: int = 3
    reason: str = ""
    message: str = ""
    log_lines: list[str] = field(default_factory=list)
    # Polls before the pods are scheduled; None: never (the cluster has no free GPUs).
    pending_polls: int | None = 0


@dataclass
class FakeCluster:
    """The server's state, which tests inspect."""

    script: Script
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    created: int = 0
    requests: list[str] = field(default_factory=list)
    polls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def status(self, kind: str) -> dict[str, Any]:
        conditions = [{"type": "Created", "status": "True"}]
        if kind == "PyTorchJob" and self.scheduled():
            conditions.append({"type": "Running", "status": "True"})
        outcome = self.script.outcome
        if outcome and self.scheduled() and self.polls > self.script.after_polls:
            if kind == "TrainJob" and outcome == "Succeeded":
                outcome = "Complete"
            conditions.append(
                {"type": outcome, "status": "True", "reason": self.script.reason,
                 "message": self.script.message}
            )  # fmt: skip
        return {"conditions": conditions}

    def scheduled(self) -> bool:
        pending = self.script.pending_polls
        return pending is not None and self.polls > pending

    def pods(self) -> list[dict[str, Any]]:
        """Every pod of every job, labelled as its operator labels them."""
        pods = []
        for name, job in self.jobs.items():
            pods += [_pod(name, labels, self.scheduled()) for labels in _pod_labels(name, job)]
        return pods

    def events(self, involved: str) -> list[dict[str, Any]]:
        if self.scheduled() or not any(p["metadata"]["name"] == involved for p in self.pods()):
            return []
        return [
            {"metadata": {"name": f"{involved}.1"}, "type": "Warning", "reason": "FailedScheduling",
             "message": UNSCHEDULABLE, "involvedObject": {"name": involved}}
        ]  # fmt: skip

    def log(self, query: dict[str, list[str]]) -> str:
        lines = self.script.log_lines[: self.polls]
        # RFC 3339 with trimmed nanoseconds, like the kubelet: ".5Z" comes before ".501000001Z".
        stamps = [f"{500_000_000 + i * 1_000_001:09d}".rstrip("0") for i in range(len(lines))]
        stamped = [
            f"2025-01-01T00:00:00.{s}Z {line}" for s, line in zip(stamps, lines, strict=True)
        ]
        if query.get("timestamps", [""])[0].lower() != "true":
            stamped = lines
        if "tailLines" in query:
            stamped = stamped[-int(query["tailLines"][0]) :]
        return "".join(line + "\n" for line in stamped)


def _pod_labels(name: str, job: dict[str, Any]) -> list[dict[str, str]]:
    if job["kind"] == "TrainJob":
        return [
            {
                "jobset.sigs.k8s.io/jobset-name": name,
                "batch.kubernetes.io/job-completion-index": str(i),
            }
            for i in range(job["spec"]["trainer"]["numNodes"])
        ]
    return [
        {"training.kubeflow.org/job-name": name,
         "training.kubeflow.org/replica-type": replica.lower(),
         "training.kubeflow.org/replica-index": str(i)}
        for replica, spec in job["spec"]["pytorchReplicaSpecs"].items()
        for i in range(spec["replicas"])
    ]  # fmt: skip


def _pod(job: str, labels: dict[str, str], scheduled: bool) -> dict[str, Any]:
    index = labels.get("batch.kubernetes.io/job-completion-index")
    replica = labels.get("training.kubeflow.org/replica-type", "node")
    name = f"{job}-{replica}-{index or labels.get('training.kubeflow.org/replica-index')}"
    status: dict[str, Any] = {"phase": "Running"}
    if not scheduled:
        status = {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                            "message": UNSCHEDULABLE}],
        }  # fmt: skip
    return {"metadata": {"name": name, "labels": labels}, "status": status}


def _matches(labels: dict[str, str], selector: str) -> bool:
    terms = dict(term.split("=", 1) for term in selector.split(",") if term)
    return all(labels.get(key) == value for key, value in terms.items())


def _handler(cluster: FakeCluster) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            """Quiet: tests read ``cluster.requests`` instead."""

        def _reply(self, code: int, body: object, content_type: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _not_found(self, what: str) -> None:
            self._reply(404, {"kind": "Status", "status": "Failure", "reason": "NotFound",
                              "message": f"{what} not found", "code": 404})  # fmt: skip

        def _list(self, kind: str, items: list[dict[str, Any]]) -> None:
            self._reply(200, {"kind": kind, "apiVersion": "v1", "metadata": {}, "items": items})

        def _route(self, method: str) -> None:
            url = urlparse(self.path)
            query = parse_qs(url.query)
            with cluster.lock:
                cluster.requests.append(f"{method} {url.path}?{url.query}".rstrip("?"))
                if match := JOBS.fullmatch(url.path):
                    self._jobs(method, match.group(2), match.group(4))
                elif (match := POD_LOG.fullmatch(url.path)) and method == "GET":
                    self._reply(200, cluster.log(query), "text/plain")
                elif (match := PODS.fullmatch(url.path)) and method == "GET":
                    selector = query.get("labelSelector", [""])[0]
                    pods = [
                        p for p in cluster.pods() if _matches(p["metadata"]["labels"], selector)
                    ]
                    self._list("PodList", pods)
                elif (match := EVENTS.fullmatch(url.path)) and method == "GET":
                    field_selector = query.get("fieldSelector", [""])[0]
                    involved = field_selector.removeprefix("involvedObject.name=")
                    self._list("EventList", cluster.events(involved))
                else:
                    self._not_found(url.path)

        def _jobs(self, method: str, namespace: str, name: str | None) -> None:
            if method == "POST" and name is None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert body["metadata"]["namespace"] == namespace
                if body["metadata"]["name"] in cluster.jobs:
                    status = {"kind": "Status", "reason": "AlreadyExists", "code": 409}
                    self._reply(409, status)
                    return
                cluster.jobs[body["metadata"]["name"]] = body
                cluster.created += 1
                self._reply(201, body)
            elif name not in cluster.jobs:
                self._not_found(f"job {name}")
            elif method == "GET":
                cluster.polls += 1
                job = cluster.jobs[name]
                self._reply(200, {**job, "status": cluster.status(job["kind"])})
            elif method == "DELETE":
                del cluster.jobs[name]
                cluster.deleted.append(name)
                self._reply(200, {"kind": "Status", "status": "Success"})

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_DELETE(self) -> None:
            self._route("DELETE")

    return Handler


@contextmanager
def fake_kubernetes(script: Script) -> Iterator[tuple[FakeCluster, client.ApiClient]]:
    """Serves ``script`` on 127.0.0.1; yields the state and a client pointed at it."""
    cluster = FakeCluster(script)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(cluster))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    api_client = client.ApiClient(
        client.Configuration(host=f"http://127.0.0.1:{server.server_port}")
    )
    try:
        yield cluster, api_client
    finally:
        api_client.close()
        server.shutdown()
        server.server_close()
        thread.join()
