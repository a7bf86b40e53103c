"""A fault-injecting HTTP proxy on loopback, in front of the moto S3 server.

Point boto3 at the proxy's URL: requests pass through to moto unchanged, except those that a
:class:`Fault` matches (by method, a substring of the path, and how many times), which get an
error status with an S3 error body, a connection reset after part of the body, a stall, or
a test's action run just before the request is forwarded.
Every request is recorded, so a test can also assert what was retried.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

# How long a stalled request is held before its connection is closed (bounded, so a test
# that forgets the fault still ends).
STALL_SECONDS = 5.0


@dataclass
class Fault:
    """One kind of failure for the requests it matches.

    Attributes:
        kind: ``status`` (answer ``status`` with an S3 error ``code``), ``reset`` (forward,
            then reset the connection after ``after_bytes`` of the body), ``stall``, or
            ``before`` (run ``action``, then forward: the object changes under the request).
        match: A substring of the request path (``/bucket/key``); empty matches every path.
        method: The HTTP method it applies to.
        times: How many matching requests fail; -1 for all of them.
        status: The HTTP status of a ``status`` fault.
        code: The S3 error code in its body (``AccessDenied``, ``SlowDown``...).
        after_bytes: Body bytes a ``reset`` fault lets through.
        action: What a ``before`` fault runs.
    """

    kind: str
    match: str = ""
    method: str = "GET"
    times: int = 1
    status: int = 503
    code: str = "SlowDown"
    after_bytes: int = 0
    action: Callable[[], None] | None = None

    def takes(self, method: str, path: str) -> bool:
        """Whether this request fails (and counts it against ``times``)."""
        if method != self.method or self.match not in path or self.times == 0:
            return False
        if self.times > 0:
            self.times -= 1
        return True


class FaultProxy:
    """The proxy's state: the upstream, the faults to inject and the requests seen."""

    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.injected: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        self.url = ""

    def add(self, fault: Fault) -> Fault:
        """Injects ``fault`` into the requests from now on."""
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Lets every request through again."""
        with self.lock:
            self.faults.clear()

    def fault_for(self, method: str, path: str) -> Fault | None:
        with self.lock:
            self.requests.append((method, path))
            for fault in self.faults:
                if fault.takes(method, path):
                    self.injected.append((fault.kind, method, path))
                    return fault
        return None


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    """Runs a :class:`FaultProxy` in front of ``upstream`` (an ``http://host:port`` URL)."""
    proxy = FaultProxy(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _relay(self) -> None:
            body = self._request_body()
            fault = proxy.fault_for(self.command, self.path)
            if fault is not None and fault.kind == "status":
                self._error(fault)
                return
            if fault is not None and fault.kind == "stall":
                time.sleep(STALL_SECONDS)
                self.close_connection = True
                return
            if fault is not None and fault.kind == "before" and fault.action is not None:
                fault.action()
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
            headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            upstream.close()
            if fault is not None and fault.kind == "reset":
                self.wfile.write(payload[: fault.after_bytes])
                self.wfile.flush()
                # SO_LINGER 0: close with a TCP reset, as a dropped connection looks.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                return
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _request_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunk = self.rfile.read(size)
                    self.rfile.readline()
                    if size == 0:
                        return b"".join(chunks)
                    chunks.append(chunk)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _error(self, fault: Fault) -> None:
            body = (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}</Code>"
                f"<Message>injected by the test</Message></Error>"
            ).encode()
            self.send_response(fault.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay  # noqa: N815

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
