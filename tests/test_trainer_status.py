"""Progress into ``TrainJob.status.trainerStatus``, against a loopback HTTPS status server.

The server enforces what Kubeflow Trainer v2.3's status server does
(``tests/schemas/trainer-v2.3.0/PROGRESS-PROTOCOL.md``): POST to the TrainJob's status path
only, the current bearer token, at most 64 KiB, and a ``trainerStatus`` that the vendored
TrainJob CRD's schema accepts.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from system_tools import free_port
from trainer_status_server import (
    INT32_MAX,
    MAX_BODY,
    STATUS_PATH,
    StatusServer,
    make_tls,
    trainer_status_validator,
)

from ladder_siam.pretrain.config import make_config
from ladder_siam.pretrain.train import pretrain
from ladder_siam.runtime import trainer_status
from ladder_siam.runtime.trainer_status import TrainerStatus, status_metrics

pytestmark = pytest.mark.integration
LOGGER = trainer_status.__name__


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server(tls: tuple[ssl.SSLContext, Path]) -> Iterator[StatusServer]:
    trainer_status_validator()  # built before serving, so that no request waits for it
    status_server = StatusServer(tls[0], token="token-1")
    thread = threading.Thread(target=status_server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield status_server
    status_server.shutdown()
    status_server.server_close()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("token-1\n")
    return path


@pytest.fixture
def make_reporter(
    server: StatusServer, token_file: Path, tls: tuple[ssl.SSLContext, Path]
) -> Iterator[Callable[..., TrainerStatus]]:
    """Builds reporters for ``server`` (arguments override), closing each after the test."""
    made: list[TrainerStatus] = []

    def make(**overrides: Any) -> TrainerStatus:
        arguments = {"url": server.url, "token_file": str(token_file), "ca_file": str(tls[1])}
        reporter = TrainerStatus(**{**arguments, "timeout": 1.0, **overrides})
        made.append(reporter)
        return reporter

    yield make
    for reporter in made:
        reporter.close()


def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def shown(payload: dict[str, Any]) -> dict[str, str]:
    """The metrics of an accepted body, as ``kubectl`` would list them."""
    return {item["name"]: item["value"] for item in payload["trainerStatus"]["metrics"]}


def test_updates_reach_the_server_with_integer_progress_and_a_measured_eta(
    server: StatusServer, make_reporter: Callable[..., TrainerStatus]
) -> None:
    reporter = make_reporter(min_interval=0.0)
    before_first = time.monotonic()
    reporter.update(5_000, 20_000, {"loss": 1.234567, "images_per_second": 12345.6})
    after_first = time.monotonic()
    wait_until(lambda: len(server.accepted) == 1)
    time.sleep(0.2)
    before_second = time.monotonic()
    reporter.update(5_100, 20_000, {"loss": 1.2, "epoch": 3})
    after_second = time.monotonic()
    wait_until(lambda: len(server.accepted) == 2)

    first, second = (payload["trainerStatus"] for payload in server.accepted)
    assert first["progressPercentage"] == 25
    assert "estimatedRemainingSeconds" not in first  # no step timed yet: unknown, not 0
    assert shown(server.accepted[0]) == {"loss": "1.235", "images_per_second": "12346"}
    assert type(second["progressPercentage"]) is int
    assert type(second["estimatedRemainingSeconds"]) is int
    # 14,900 steps left at the time per step measured over the last 100.
    fastest = (before_second - after_first) / 100 * 14_900
    slowest = (after_second - before_first) / 100 * 14_900
    assert round(fastest) <= second["estimatedRemainingSeconds"] <= round(slowest)
    assert datetime.strptime(second["lastUpdatedTime"], "%Y-%m-%dT%H:%M:%S%z") <= datetime.now(UTC)
    assert shown(server.accepted[1]) == {"loss": "1.2", "images_per_second": "12346", "epoch": "3"}


def test_updates_within_the_interval_send_one_and_the_final_one_always_goes(
    server: StatusServer, make_reporter: Callable[..., TrainerStatus]
) -> None:
    reporter = make_reporter(min_interval=60.0)
    reporter.update(10, 100, {"loss": 2.0})
    wait_until(lambda: len(server.accepted) == 1)
    for step in (20, 30, 40):
        reporter.update(step, 100, {"loss": 2.0 - step / 100, "rankme_res5": float(step)})
    time.sleep(0.1)
    assert [p["trainerStatus"]["progressPercentage"] for p in server.accepted] == [10]

    reporter.finish(100, {"loss": 1.5})

    # finish() returns once the server has it; a throttled update's RankMe is carried along.
    final = server.accepted[-1]
    assert len(server.accepted) == 2
    assert final["trainerStatus"]["progressPercentage"] == 100
    assert final["trainerStatus"]["estimatedRemainingSeconds"] == 0
    assert shown(final) == {"loss": "1.5", "rankme_res5": "40"}


def test_the_final_update_right_after_another_is_the_last_the_server_sees(
    server: StatusServer, make_reporter: Callable[..., TrainerStatus]
) -> None:
    reporter = make_reporter()
    reporter.update(99, 100, {"loss": 1.0})
    reporter.finish(100, {"loss": 0.9})
    assert 1 <= len(server.accepted) <= 2  # the final one may replace the one still waiting
    assert server.accepted[-1]["trainerStatus"]["progressPercentage"] == 100


def test_the_token_file_is_read_again_at_every_send(
    server: StatusServer, make_reporter: Callable[..., TrainerStatus], token_file: Path
) -> None:
    reporter = make_reporter(min_interval=0.0)
    reporter.update(1, 10, {"loss": 1.0})
    wait_until(lambda: len(server.accepted) == 1)
    # The kubelet rotates the projected token; the server accepts only the current one.
    token_file.write_text("token-2\n")
    server.token = "token-2"
    reporter.update(2, 10, {"loss": 0.9})
    wait_until(lambda: len(server.accepted) == 2)
    assert server.answered == [200, 200]


def _refuse_with_token(server: StatusServer, overrides: dict[str, Any]) -> None:
    server.token = "the kubelet's newer token"


def _refuse_unknown_trainjob(server: StatusServer, overrides: dict[str, Any]) -> None:
    overrides["url"] = server.url.replace("/ladder-run/", "/deleted-run/")


def _fail_inside(server: StatusServer, overrides: dict[str, Any]) -> None:
    server.fail_with = 500


def _untrusted_certificate(server: StatusServer, overrides: dict[str, Any]) -> None:
    overrides["ca_file"] = None  # the system's CAs did not sign the trainer's certificate


def _closed_port(server: StatusServer, overrides: dict[str, Any]) -> None:
    overrides["url"] = f"https://127.0.0.1:{free_port()}{STATUS_PATH}"


def _missing_token_file(server: StatusServer, overrides: dict[str, Any]) -> None:
    overrides["token_file"] = "/nonexistent/kubeflow/trainer/token"


@pytest.mark.parametrize(
    ("breakage", "says"),
    [
        (_refuse_with_token, "403"),
        (_refuse_unknown_trainjob, "404"),
        (_fail_inside, "internal error"),
        (_untrusted_certificate, "CERTIFICATE_VERIFY_FAILED"),
        (_closed_port, "refused"),
        (_missing_token_file, "No such file"),
    ],
)
def test_a_failing_server_costs_one_warning_and_never_blocks_or_raises(
    breakage: Callable[[StatusServer, dict[str, Any]], None],
    says: str,
    server: StatusServer,
    make_reporter: Callable[..., TrainerStatus],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    overrides: dict[str, Any] = {"min_interval": 0.0}
    breakage(server, overrides)
    reporter = make_reporter(**overrides)

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "not sent" in r.getMessage()]

    durations = []
    for attempt in range(1, 4):
        started = time.monotonic()
        reporter.update(attempt, 10, {"loss": 1.0})
        durations.append(time.monotonic() - started)
        wait_until(lambda attempt=attempt: len(failures()) == attempt)
    reporter.finish(10, {"loss": 1.0})

    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert says in warnings[0].getMessage()
    assert [r.levelno for r in failures()[1:]] == [logging.DEBUG] * 3
    assert max(durations) < 0.2  # the send timeout is 1 s
    assert server.accepted == []


def test_a_slow_server_times_out_in_the_background(
    server: StatusServer,
    make_reporter: Callable[..., TrainerStatus],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.delay = 1.0
    reporter = make_reporter(min_interval=0.0, timeout=0.3)
    started = time.monotonic()
    reporter.update(1, 10, {"loss": 1.0})
    assert time.monotonic() - started < 0.1
    reporter.finish(10, {"loss": 1.0})
    assert time.monotonic() - started < 3 * 0.3 + 0.3  # finish() waits three timeouts at most
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "timed out" in caplog.records[0].getMessage()


def test_a_recovered_server_is_logged_once_and_a_new_failure_warns_again(
    server: StatusServer,
    make_reporter: Callable[..., TrainerStatus],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    reporter = make_reporter(min_interval=0.0)
    for sent, token in enumerate(("stale", "token-1", "token-1", "stale"), start=1):
        server.token = token
        reporter.update(sent, 10, {"loss": 1.0})
        # Answered, so taken by the sender: the next update cannot replace it.
        wait_until(lambda sent=sent: len(server.answered) == sent)
    wait_until(lambda: len(caplog.records) == 3)
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO", "WARNING"]
    assert "again" in caplog.records[1].getMessage()


def test_metrics_fit_the_crd_limits(
    server: StatusServer, make_reporter: Callable[..., TrainerStatus]
) -> None:
    metrics = {
        "n" * 100: 0.5,
        "": 1.0,
        "huge": 10**70,
        "diverged": float("nan"),
        "exploded": float("-inf"),
        "tiny": 0.000123456,
        **{f"extra_{i}": float(i) for i in range(300)},
    }
    reporter = make_reporter()
    reporter.finish(10, metrics)

    [payload] = server.accepted  # the server's schema check passed: at most 256, 1..64 chars
    items = payload["trainerStatus"]["metrics"]
    assert len(items) == 256
    assert items[0] == {"name": "n" * 64, "value": "0.5"}
    assert items[1:5] == [
        {"name": "huge", "value": "1e+70"},
        {"name": "diverged", "value": "nan"},  # shown, so a diverged run does not look healthy
        {"name": "exploded", "value": "-inf"},
        {"name": "tiny", "value": "0.0001235"},
    ]
    assert items[-1] == {"name": "extra_250", "value": "250"}
    assert len(json.dumps(payload)) < MAX_BODY


def test_interval_records_become_clean_metric_names() -> None:
    record = {
        "step": 400, "epoch": 2, "lr": 0.9, "tau": 0.996, "loss": 3.1, "loss_res4": 0.8,
        "loss_res5": 1.9, "std_res5": 0.044, "online_probe_top1_res5": 31.5, "rankme_res5": 812.0,
        "rankme_projector_res5": 140.0, "images_per_second": 2210.0,
        "data_wait_fraction": 0.02, "time": 1.8e9,
    }  # fmt: skip
    assert status_metrics(record) == {
        "epoch": 2, "images_per_second": 2210.0, "loss": 3.1, "loss_res4": 0.8, "loss_res5": 1.9,
        "std_res5": 0.044, "probe_top1_res5": 31.5, "rankme_res5": 812.0,
        "rankme_projector_res5": 140.0,
    }  # fmt: skip


def test_from_env_reads_the_trainers_variables_and_is_none_without_a_url() -> None:
    assert TrainerStatus.from_env({}) is None
    assert TrainerStatus.from_env({"KUBEFLOW_TRAINER_SERVER_URL": ""}) is None
    reporter = TrainerStatus.from_env(
        {
            "KUBEFLOW_TRAINER_SERVER_URL": f"https://trainer.example{STATUS_PATH}",
            "KUBEFLOW_TRAINER_SERVER_TOKEN": "/var/run/secrets/kubeflow/trainer/token",
            "KUBEFLOW_TRAINER_SERVER_CA_CERT": "/var/run/secrets/kubeflow/trainer/ca.crt",
        }
    )
    assert reporter is not None
    reporter.close()
    assert reporter.token_file == "/var/run/secrets/kubeflow/trainer/token"
    assert reporter.ca_file == "/var/run/secrets/kubeflow/trainer/ca.crt"


@pytest.mark.parametrize(
    "broken",
    [
        {"progressPercentage": 25.0},  # a JSON float: Go cannot decode it into an int32
        {"progressPercentage": 101},
        {"estimatedRemainingSeconds": -1},
        {"estimatedRemainingSeconds": INT32_MAX + 1},
        {"metrics": [{"name": "loss", "value": 1.5}]},  # values are strings
        {"metrics": [{"name": "x" * 65, "value": "1"}]},
        {"metrics": [{"name": "loss", "value": ""}]},
        {"metrics": [{"name": f"m{i}", "value": "1"} for i in range(257)]},
        {"lastUpdatedTime": None},
        {"lastUpdatedTime": "2026-12-05 08:00"},
        {"progress": 25},
    ],
)
def test_the_test_server_refuses_what_the_trainer_refuses(broken: dict[str, Any]) -> None:
    status = {"progressPercentage": 25, "lastUpdatedTime": "2026-12-05T08:00:00Z", **broken}
    status = {key: value for key, value in status.items() if value is not None}
    assert list(trainer_status_validator().iter_errors(status))


@pytest.mark.slow
def test_a_pretraining_run_in_a_trainjob_reports_its_intervals_and_ends_at_100(
    shards: str,
    server: StatusServer,
    token_file: Path,
    tls: tuple[ssl.SSLContext, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = make_config(
        "tiny_cpu", shards=shards, out=str(tmp_path / "run"), max_steps=4, log_every=2,
        checkpoint_every=4, workers=0, metrics_port=None, image_size=24,
    )  # fmt: skip
    monkeypatch.setenv(trainer_status.URL_VARIABLE, server.url)
    monkeypatch.setenv(trainer_status.TOKEN_VARIABLE, str(token_file))
    monkeypatch.setenv(trainer_status.CA_VARIABLE, str(tls[1]))
    pretrain(config)
    # The first interval's update goes out; the second falls within 30 s; the final one always.
    progress = [body["trainerStatus"]["progressPercentage"] for body in server.accepted]
    assert progress == [50, 100]
    final = shown(server.accepted[-1])
    assert server.accepted[-1]["trainerStatus"]["estimatedRemainingSeconds"] == 0
    levels = ["res2", "res3", "res4", "res5"]
    assert {"loss", "images_per_second", *(f"loss_{lv}" for lv in levels)} <= set(final)
    assert {f"std_{lv}" for lv in levels} <= set(final)
    assert float(final["loss"]) > 0
