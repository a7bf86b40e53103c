"""Shared fixtures: real servers on loopback, started once per test session."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_proxy import FaultProxy, fault_proxy
from system_tools import free_port, require_tool, wait_for_port

from ladder_siam.io import storage
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.prepare_shards import prepare_shards


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's standalone S3 server on loopback: real HTTP, real boto3, fake credentials."""
    # The dev extra installs it beside this interpreter; PATH need not include the venv.
    server = require_tool(str(Path(sys.executable).parent / "moto_server"))
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [server, "-H", "127.0.0.1", "-p", str(port)], stdout=log_file, stderr=log_file
        )
        try:
            wait_for_port(port)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the moto server; returns its ``s3://`` URI."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Labelled demo shards for tiny pretraining runs: 200 images of 40 px."""
    root = tmp_path_factory.mktemp("pretrain")
    make_demo_data(str(root / "raw"), images=200, size=40)
    prepare_shards(str(root / "raw" / "imagefolder"), str(root / "shards"), shard_size=50)
    return str(root / "shards")


@pytest.fixture
def proxy(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultProxy]:
    """Every S3 call of the test goes through a fault proxy in front of the moto server."""
    with fault_proxy(s3_endpoint) as running:
        storage.set_s3_endpoint(running.url)
        yield running
    storage.set_s3_endpoint(s3_endpoint)
