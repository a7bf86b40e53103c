"""Debian's Prometheus and Pushgateway on loopback, and helpers to read what they hold.

These are context managers, not fixtures: a fixture imported into a test module reads to ruff
as an unused import shadowed by a parameter (F401, F811), so each test module wraps them in
fixtures of the scope it needs, e.g. a module-scoped Prometheus pointed at its own targets.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from system_tools import free_port, require_tool

PROMETHEUS = "/usr/bin/prometheus"
PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"
STARTUP_TIMEOUT = 30.0


@contextmanager
def prometheus_server(
    targets: Sequence[str], directory: Path, scrape_interval: str = "1s"
) -> Iterator[str]:
    """Runs Prometheus scraping ``targets`` (``host:port``, path ``/metrics``); yields its URL.

    Targets need not listen yet: Prometheus retries each scrape interval, so a test may start
    its exporter (or a training run) after the server.
    """
    binary = require_tool(PROMETHEUS)
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "scrape_configs": [
            {"job_name": "ladder-siam", "static_configs": [{"targets": list(targets)}]}
        ],
    }
    config_file = directory / "prometheus.yml"
    # JSON is valid YAML, so the config needs no YAML writer.
    config_file.write_text(json.dumps(config, indent=2))
    port = free_port()
    command = [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with _running(command, directory / "prometheus.log", f"http://127.0.0.1:{port}") as url:
        yield url


@contextmanager
def pushgateway_server(directory: Path) -> Iterator[str]:
    """Runs a Pushgateway of its own (nothing pushed elsewhere shows); yields its URL."""
    binary = require_tool(PUSHGATEWAY)
    port = free_port()
    # Debian's build persists to /var/lib/prometheus/pushgateway.data by default, which would
    # carry one test's groups into every later gateway.
    persistence = directory / "pushgateway.data"
    command = [
        binary,
        f"--web.listen-address=127.0.0.1:{port}",
        f"--persistence.file={persistence}",
    ]
    with _running(command, directory / "pushgateway.log", f"http://127.0.0.1:{port}") as url:
        yield url


def query(prometheus_url: str, promql: str) -> list[dict]:
    """Evaluates an instant PromQL query; returns the result's series (``metric``, ``value``)."""
    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for_query(prometheus_url: str, promql: str, timeout: float = 30.0) -> list[dict]:
    """Polls a query until it returns a series, e.g. ``ladder_siam_epoch == 3``; returns them.

    Raises:
        TimeoutError: Nothing came back within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = query(prometheus_url, promql)
        if result:
            return result
        time.sleep(0.25)
    raise TimeoutError(f"{promql!r} returned nothing within {timeout} s")


def scrape(metrics_url: str) -> list[Sample]:
    """Fetches a text exposition (an exporter's or the Pushgateway's ``/metrics``)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def pushed_groups(pushgateway_url: str) -> list[dict[str, str]]:
    """The grouping labels (``job`` included) of every group a Pushgateway holds."""
    with urllib.request.urlopen(f"{pushgateway_url}/api/v1/metrics", timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return [group["labels"] for group in body["data"]]


def sample_value(samples: Sequence[Sample], name: str, **labels: str) -> float | None:
    """The value of the sample called ``name`` whose labels include ``labels``, or None."""
    for sample in samples:
        if sample.name == name and labels.items() <= sample.labels.items():
            return sample.value
    return None


@contextmanager
def _running(command: list[str], log_file: Path, url: str) -> Iterator[str]:
    with log_file.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_ready(url, process, log_file)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_ready(url: str, process: subprocess.Popen, log_file: Path) -> None:
    # Both servers answer /-/ready with 200 only once they serve (Prometheus: TSDB opened).
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited: {log_file.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {STARTUP_TIMEOUT} s: {log_file.read_text()[-2000:]}")
