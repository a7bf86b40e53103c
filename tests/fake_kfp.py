"""A fake Kubeflow Pipelines API server (REST ``/apis/v2beta1``) on loopback.

Kubeflow Pipelines' API server needs a database, object store and Argo, so it cannot run in
the tests; this fake serves just the endpoints ``kfp.Client`` 2.17 calls for
``ladder-siam pipeline submit|schedule``, over real HTTP to the real client:

* ``GET  /apis/v2beta1/healthz``: the client asks at construction whether the install is
  multi-user (``multi_user``).
* ``POST /apis/v2beta1/pipelines/upload`` and ``/pipelines/upload_version``: multipart uploads
  (form field ``uploadfile``; ``name``, ``display_name``, ``description``, ``namespace``,
  ``pipelineid`` in the query). Like the real server, uploading a pipeline also creates its
  first version under the pipeline's name, and a name already taken is a 409.
* ``GET  /apis/v2beta1/pipelines`` and ``/pipelines/{id}/versions``: lists with KFP's
  ``filter`` (JSON predicates; ``EQUALS`` on string fields), ``page_size`` and ``page_token``.
* ``GET``/``POST /apis/v2beta1/experiments`` (the client gets an experiment by listing with a
  ``display_name`` filter, then creates it when the list is empty).
* ``POST /apis/v2beta1/runs`` and ``/recurringruns``: the request body is kept as sent (plus
  the ids and times the server adds), after the checks the real server makes (a 6-field cron,
  ``max_concurrency`` 1-10, either a pipeline spec or an existing version).

JSON field names are the API's (protojson with proto names: snake_case), as in
``kfp_server_api.models``' ``attribute_map``. In single-user mode (the default) the server
ignores namespaces, as the real one does. ``FakeKfp`` is the state the tests inspect.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

API = "/apis/v2beta1"
VERSIONS = re.compile(rf"{API}/pipelines/([^/:]+)/versions")
EXPERIMENT = re.compile(rf"{API}/experiments/([^/:]+)")
# Filter operations as the client sends them (numbers) or as their proto names.
EQUALS = (1, "EQUALS")
# grpc codes of the errors the fake returns.
INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS = 3, 5, 6


class ApiError(Exception):
    """An error reply: HTTP status, grpc code and message."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class Upload:
    """One multipart upload, as received."""

    kind: str  # "pipeline" or "version"
    query: dict[str, str]
    filename: str
    text: str  # the uploaded YAML

    def docs(self) -> list[Any]:
        """The YAML's documents: the pipeline spec, then the platform spec if any."""
        return list(yaml.safe_load_all(self.text))


@dataclass
class FakeKfp:
    """The server's state, which tests inspect. Resources are the API's JSON objects."""

    multi_user: bool = False
    pipelines: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    experiments: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    recurring_runs: list[dict[str, Any]] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def namespace(self, namespace: str | None) -> str:
        """What the server keeps: single-user installs drop namespaces."""
        return (namespace or "") if self.multi_user else ""

    def version(self, version_id: str) -> dict[str, Any]:
        """The pipeline version with this id."""
        return _find(self.versions, "pipeline_version_id", version_id, "pipeline version")

    def version_yaml(self, version_id: str) -> str:
        """The YAML text uploaded for this pipeline version."""
        return self.version(version_id)["_yaml"]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _find(items: list[dict[str, Any]], key: str, value: str, what: str) -> dict[str, Any]:
    for item in items:
        if item[key] == value:
            return item
    raise ApiError(404, NOT_FOUND, f"{what} {value} not found")


def _public(item: dict[str, Any]) -> dict[str, Any]:
    """The resource as the API returns it: without the fake's own ``_`` fields."""
    return {key: value for key, value in item.items() if not key.startswith("_")}


def _predicate(predicate: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    if predicate.get("operation") not in EQUALS:
        raise ApiError(400, INVALID_ARGUMENT, f"fake: unsupported filter {predicate}")
    values = [predicate[k] for k in ("string_value", "stringValue") if k in predicate]
    if not values:
        raise ApiError(400, INVALID_ARGUMENT, f"fake: unsupported filter value {predicate}")
    key = predicate["key"]
    return lambda item: item.get(key) == values[0]


def _listed(
    items: list[dict[str, Any]], query: dict[str, str], key: str, allowed_keys: set[str]
) -> dict[str, Any]:
    """A list reply: ``filter`` applied, one page of ``page_size`` from ``page_token``."""
    selected = items
    if query.get("filter"):
        predicates = json.loads(query["filter"]).get("predicates", [])
        for predicate in predicates:
            if predicate.get("key") not in allowed_keys:
                raise ApiError(400, INVALID_ARGUMENT, f"invalid filter key {predicate.get('key')}")
        tests = [_predicate(p) for p in predicates]
        selected = [item for item in items if all(test(item) for test in tests)]
    start = int(query.get("page_token") or 0)
    size = int(query.get("page_size") or 0) or len(selected)
    page = selected[start : start + size]
    reply: dict[str, Any] = {"total_size": len(selected)}
    if page:  # protojson leaves empty lists out: the client then sees None.
        reply[key] = [_public(item) for item in page]
    if start + size < len(selected):
        reply["next_page_token"] = str(start + size)
    return reply


def _multipart(content_type: str, body: bytes) -> tuple[str, bytes]:
    """The ``uploadfile`` part of a multipart/form-data body: (filename, content), byte-exact."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/form-data") or not boundary:
        raise ApiError(400, INVALID_ARGUMENT, "Failed to read pipeline from file")
    for part in body.split(b"--" + boundary.group(1).encode())[1:-1]:
        head, _, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        disposition = re.search(rb"(?im)^content-disposition:(.*)$", head)
        if disposition and re.search(rb'\bname="uploadfile"', disposition.group(1)):
            filename = re.search(rb'filename="([^"]*)"', disposition.group(1))
            name = filename.group(1).decode() if filename else ""
            return name, content.removesuffix(b"\r\n")
    raise ApiError(400, INVALID_ARGUMENT, "Failed to read pipeline from file")


def _spec(text: str) -> Any:
    """The pipeline spec object the server returns for a version (pipeline + platform)."""
    docs = list(yaml.safe_load_all(text))
    if len(docs) == 1:
        return docs[0]
    return {"pipeline_spec": docs[0], "platform_spec": docs[1]}


class _Api:
    """The endpoints, on a ``FakeKfp``; each returns the reply's JSON or raises ``ApiError``."""

    def __init__(self, state: FakeKfp) -> None:
        self.state = state

    def upload(self, query: dict[str, str], filename: str, data: bytes) -> dict[str, Any]:
        state = self.state
        text = data.decode()
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as error:
            raise ApiError(400, INVALID_ARGUMENT, f"invalid pipeline spec: {error}") from None
        if not docs or "pipelineInfo" not in (docs[0] or {}):
            raise ApiError(400, INVALID_ARGUMENT, "invalid pipeline spec: no pipelineInfo")
        name = query.get("name") or query.get("display_name") or filename
        display_name = query.get("display_name") or name
        namespace = state.namespace(query.get("namespace"))
        if any(p["name"] == name and p["namespace"] == namespace for p in state.pipelines):
            raise ApiError(
                409, ALREADY_EXISTS, "Failed to create a pipeline and a pipeline version"
            )
        state.uploads.append(Upload("pipeline", query, filename, text))
        pipeline = {
            "pipeline_id": str(uuid.uuid4()),
            "name": name,
            "display_name": display_name,
            "description": query.get("description", ""),
            "created_at": _now(),
            "namespace": namespace,
        }
        state.pipelines.append(pipeline)
        self._add_version(pipeline["pipeline_id"], name, display_name, query, text)
        return pipeline

    def upload_version(self, query: dict[str, str], filename: str, data: bytes) -> dict[str, Any]:
        state = self.state
        pipeline_id = query.get("pipelineid", "")
        if not pipeline_id:
            raise ApiError(400, INVALID_ARGUMENT, "Failed to create a pipeline version")
        _find(state.pipelines, "pipeline_id", pipeline_id, "pipeline")
        name = query.get("name") or query.get("display_name") or filename
        if any(v["pipeline_id"] == pipeline_id and v["name"] == name for v in state.versions):
            raise ApiError(409, ALREADY_EXISTS, "Failed to create a pipeline version")
        text = data.decode()
        state.uploads.append(Upload("version", query, filename, text))
        display_name = query.get("display_name") or name
        return self._add_version(pipeline_id, name, display_name, query, text)

    def _add_version(
        self, pipeline_id: str, name: str, display_name: str, query: dict[str, str], text: str
    ) -> dict[str, Any]:
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": str(uuid.uuid4()),
            "name": name,
            "display_name": display_name,
            "description": query.get("description", ""),
            "created_at": _now(),
            "pipeline_spec": _spec(text),
            "_yaml": text,
        }
        self.state.versions.append(version)
        return _public(version)

    def list_pipelines(self, query: dict[str, str]) -> dict[str, Any]:
        namespace = self.state.namespace(query.get("namespace"))
        mine = [p for p in self.state.pipelines if p["namespace"] == namespace]
        keys = {"pipeline_id", "name", "display_name", "description", "namespace"}
        return _listed(mine, query, "pipelines", keys)

    def list_versions(self, pipeline_id: str, query: dict[str, str]) -> dict[str, Any]:
        _find(self.state.pipelines, "pipeline_id", pipeline_id, "pipeline")
        mine = [v for v in self.state.versions if v["pipeline_id"] == pipeline_id]
        keys = {"pipeline_version_id", "name", "display_name", "description"}
        return _listed(mine, query, "pipeline_versions", keys)

    def list_experiments(self, query: dict[str, str]) -> dict[str, Any]:
        namespace = self.state.namespace(query.get("namespace"))
        mine = [e for e in self.state.experiments if e["namespace"] == namespace]
        keys = {"experiment_id", "display_name", "description", "namespace"}
        return _listed(mine, query, "experiments", keys)

    def create_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        state = self.state
        if not body.get("display_name"):
            raise ApiError(400, INVALID_ARGUMENT, "Experiment display_name is required")
        namespace = state.namespace(body.get("namespace"))
        if state.multi_user and not namespace:
            raise ApiError(400, INVALID_ARGUMENT, "Namespace is required in multi-user mode")
        name = body["display_name"]
        if any(
            e["display_name"] == name and e["namespace"] == namespace for e in state.experiments
        ):
            raise ApiError(409, ALREADY_EXISTS, f"experiment {name} already exists")
        experiment = {
            "experiment_id": str(uuid.uuid4()),
            "display_name": name,
            "description": body.get("description") or "",
            "created_at": _now(),
            "namespace": namespace,
            "storage_state": "AVAILABLE",
        }
        state.experiments.append(experiment)
        return experiment

    def _check_job(self, body: dict[str, Any], what: str) -> None:
        """What the server checks of a run or recurring run before accepting it."""
        if not body.get("display_name"):
            raise ApiError(400, INVALID_ARGUMENT, f"{what} display_name is required")
        if body.get("experiment_id"):
            _find(self.state.experiments, "experiment_id", body["experiment_id"], "experiment")
        reference = body.get("pipeline_version_reference")
        if bool(body.get("pipeline_spec")) == bool(reference):
            raise ApiError(
                400, INVALID_ARGUMENT, f"{what}: exactly one of pipeline_spec and a version"
            )
        if reference:
            version = self.state.version(reference.get("pipeline_version_id", ""))
            if reference.get("pipeline_id") not in (None, version["pipeline_id"]):
                raise ApiError(400, INVALID_ARGUMENT, "version does not belong to the pipeline")

    def create_run(self, body: dict[str, Any]) -> dict[str, Any]:
        self._check_job(body, "run")
        run = {
            **body,
            "run_id": str(uuid.uuid4()),
            "storage_state": "AVAILABLE",
            "created_at": _now(),
            "scheduled_at": _now(),
            "state": "PENDING",
        }
        self.state.runs.append(run)
        return run

    def create_recurring_run(self, body: dict[str, Any]) -> dict[str, Any]:
        self._check_job(body, "recurring run")
        trigger = body.get("trigger") or {}
        cron = (trigger.get("cron_schedule") or {}).get("cron")
        if cron is not None and len(cron.split()) != 6:
            # Stricter than the real server, which stores the string and leaves it to the
            # ScheduledWorkflow controller's cron parser (seconds first): there a 5-field
            # cron is misread or fails later, out of the client's sight.
            raise ApiError(400, INVALID_ARGUMENT, f"invalid cron {cron!r}: expected 6 fields")
        if cron is None and not trigger.get("periodic_schedule"):
            raise ApiError(400, INVALID_ARGUMENT, "a recurring run needs a trigger")
        concurrency = int(body.get("max_concurrency") or 0)
        if not 1 <= concurrency <= 10:
            raise ApiError(400, INVALID_ARGUMENT, "max_concurrency out of range: 1-10")
        recurring = {
            **body,
            "recurring_run_id": str(uuid.uuid4()),
            "created_at": _now(),
            "updated_at": _now(),
            "status": "ENABLED" if body.get("mode", "ENABLE") == "ENABLE" else "DISABLED",
        }
        self.state.recurring_runs.append(recurring)
        # int64 fields are strings in protojson replies.
        return {**recurring, "max_concurrency": str(concurrency)}


def _handler(state: FakeKfp) -> type[BaseHTTPRequestHandler]:
    api = _Api(state)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            """Quiet: tests read ``state.requests`` instead."""

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _route(self, method: str) -> None:
            url = urlparse(self.path)
            query = {key: values[-1] for key, values in parse_qs(url.query).items()}
            path = url.path
            body = self._body() if method == "POST" else b""
            with state.lock:
                state.requests.append(f"{method} {path}")
                try:
                    self._reply(200, self._dispatch(method, path, query, body))
                except ApiError as error:
                    self._reply(error.status, {"error": str(error), "code": error.code,
                                               "message": str(error), "details": []})  # fmt: skip

        def _dispatch(
            self, method: str, path: str, query: dict[str, str], body: bytes
        ) -> dict[str, Any]:
            content_type = self.headers.get("Content-Type", "")
            if (method, path) == ("GET", f"{API}/healthz"):
                return {"multi_user": state.multi_user}
            if (method, path) == ("POST", f"{API}/pipelines/upload"):
                return api.upload(query, *_multipart(content_type, body))
            if (method, path) == ("POST", f"{API}/pipelines/upload_version"):
                return api.upload_version(query, *_multipart(content_type, body))
            if (method, path) == ("GET", f"{API}/pipelines"):
                return api.list_pipelines(query)
            if method == "GET" and (match := VERSIONS.fullmatch(path)):
                return api.list_versions(match.group(1), query)
            if (method, path) == ("GET", f"{API}/experiments"):
                return api.list_experiments(query)
            if method == "GET" and (match := EXPERIMENT.fullmatch(path)):
                return _find(state.experiments, "experiment_id", match.group(1), "experiment")
            if (method, path) == ("POST", f"{API}/experiments"):
                return api.create_experiment(json.loads(body))
            if (method, path) == ("POST", f"{API}/runs"):
                return api.create_run(json.loads(body))
            if (method, path) == ("POST", f"{API}/recurringruns"):
                return api.create_recurring_run(json.loads(body))
            raise ApiError(404, NOT_FOUND, f"fake KFP: no route for {method} {path}")

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

    return Handler


@contextmanager
def fake_kfp(multi_user: bool = False) -> Iterator[tuple[FakeKfp, str]]:
    """Serves a fake KFP API on 127.0.0.1; yields its state and its URL (the ``--host``)."""
    state = FakeKfp(multi_user=multi_user)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
