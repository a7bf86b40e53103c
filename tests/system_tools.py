"""Finding installed tools and free loopback ports for tests that start real servers."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

# .ci/run sets this: in CI a test that needs an installed tool fails instead of skipping.
REQUIRE_TOOLS = os.environ.get("LADDER_SIAM_REQUIRE_TOOLS") == "1"


def require_tool(path_or_name: str) -> str:
    """Returns the tool's path, or skips (locally) / fails (in CI) when it is not installed."""
    found = shutil.which(path_or_name) or (path_or_name if Path(path_or_name).exists() else None)
    if found:
        return found
    message = f"{path_or_name} is not installed (see .ci/run for the packages the tests need)"
    if REQUIRE_TOOLS:
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")
