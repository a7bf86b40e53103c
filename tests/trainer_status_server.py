"""A loopback stand-in for Kubeflow Trainer v2.3's status server (TrainJob progress).

It enforces what the real server does (``tests/schemas/trainer-v2.3.0/PROGRESS-PROTOCOL.md``):
POST to the TrainJob's status path only, the current bearer token, at most 64 KiB, and a
``trainerStatus`` that the vendored TrainJob CRD's schema accepts. ``make_tls`` makes a
self-signed CA and a server certificate for 127.0.0.1, as the Trainer's webhook cert is.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import ssl
import sys
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from crd_schemas import SCHEMAS, no_unknown_fields
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

STATUS_PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs/ladder-run/status"
MAX_BODY = 64 * 1024
INT32_MAX = 2**31 - 1
TRAINJOB_CRD = SCHEMAS / "trainer-v2.3.0" / "trainer.kubeflow.org_trainjobs.yaml"


@functools.cache
def trainer_status_validator() -> jsonschema.Draft4Validator:
    """The v2.3 CRD's ``status.trainerStatus`` schema, with the rules it states outside JSON
    Schema made checkable: the CEL rule, int32, and (strict field validation) no unknown
    fields, so that a misspelt field fails here instead of being dropped by the server."""
    # Only the TrainJob CRD, with libyaml: crd_schemas() would parse every CRD, in seconds.
    crd = yaml.load(TRAINJOB_CRD.read_text(), Loader=yaml.CSafeLoader)
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    trainjob = version["schema"]["openAPIV3Schema"]
    schema = trainjob["properties"]["status"]["properties"]["trainerStatus"]
    # Translated by hand, so a rule added upstream must fail here rather than go unchecked.
    assert [rule["rule"] for rule in schema.pop("x-kubernetes-validations")] == [
        "has(self.lastUpdatedTime)"
    ]
    assert "x-kubernetes-validations" not in json.dumps(schema)
    schema["required"] = ["lastUpdatedTime"]
    for field in schema["properties"].values():
        if field.get("format") == "int32":
            field["maximum"] = min(field.get("maximum", INT32_MAX), INT32_MAX)
    return jsonschema.Draft4Validator(
        no_unknown_fields(schema), format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER
    )


class StatusServer(ThreadingHTTPServer):
    """The Trainer's status server for one TrainJob; records every accepted body."""

    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext, token: str) -> None:
        super().__init__(("127.0.0.1", 0), StatusHandler)
        self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server_address[1]}{STATUS_PATH}"
        self.token = token  # the only token accepted: the kubelet's current one
        self.delay = 0.0
        self.fail_with: int | None = None
        self.accepted: list[dict[str, Any]] = []
        self.answered: list[int] = []

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out has hung up before the (slow) answer: expected, not a bug.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class StatusHandler(BaseHTTPRequestHandler):
    server: StatusServer

    def do_POST(self) -> None:
        time.sleep(self.server.delay)
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length) if length <= MAX_BODY else b""
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if self.path != STATUS_PATH:
            self._reply(404, "the server could not find the requested resource")
        elif scheme.lower() != "bearer" or token != self.server.token:
            self._reply(403, "Forbidden")
        elif length > MAX_BODY:
            self._reply(413, "request body too large")
        elif self.server.fail_with is not None:
            self._reply(self.server.fail_with, "internal error")
        else:
            self._validate(body)

    def _validate(self, body: bytes) -> None:
        try:
            payload = json.loads(body)
            status = payload["trainerStatus"]
        except (ValueError, KeyError, TypeError):
            self._reply(422, "Invalid payload")
            return
        errors = [
            f"{list(e.absolute_path)}: {e.message}"
            for e in trainer_status_validator().iter_errors(status)
        ]
        if errors:
            self._reply(422, "; ".join(errors))
            return
        self.server.accepted.append(payload)
        self._reply(200, payload=payload)

    def _reply(self, code: int, message: str = "", payload: Any = None) -> None:
        self.server.answered.append(code)
        if payload is None:  # errors are metav1.Status objects
            payload = {"kind": "Status", "status": "Failure", "message": message, "code": code}
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass  # the tests read what the server recorded, not its access log


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls(folder: Path) -> tuple[ssl.SSLContext, Path]:
    """The server's TLS context, and the PEM of the self-signed CA that signed its cert."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("test trainer CA"))
        .issuer_name(_name("test trainer CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = folder / "ca.crt", folder / "tls.crt", folder / "tls.key"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, ca_file
