"""The exit handler leaves the Pushgateway bounded: a finished run's groups go, the outcome stays.

Against Debian's real Pushgateway: each run pushes its groups the way its steps do (a run's
groups are keyed by its folder, an arm's by ``<run>/<arm>``, a dataset's by its own folder).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_servers import pushed_groups, pushgateway_server
from system_tools import free_port

from ladder_siam.kube.steps import record_status
from ladder_siam.runtime.metrics import TrainingMetrics, delete_run_groups, push_job_metrics
from ladder_siam.runtime.run_folder import DATASETS, RunFolder, run_of

pytestmark = pytest.mark.integration  # every test talks to a real Pushgateway, or a dead one

ARMS = ("ddgg-s0", "gggg-s0")


@pytest.fixture
def pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # One gateway per test: each asserts on everything the gateway holds.
    with pushgateway_server(tmp_path_factory.mktemp("pushgateway")) as url:
        yield url


def _push_run(output_uri: str, run: str) -> None:
    """Pushes the groups of one run's steps: shards, each arm's pretraining and probe, report."""
    dataset = str(Path(output_uri) / DATASETS / "demo-0a1b2c")
    for split in ("train", "val"):
        pushed = push_job_metrics(
            "prepare-shards", {"shards": 3}, run=run_of(dataset),
            grouping={"layout": "imagefolder", "split": split},
        )  # fmt: skip
        assert pushed
    folder = RunFolder.of(output_uri, run)
    for arm in ARMS:
        arm_folder = folder.arm(arm)
        assert TrainingMetrics(method=arm[:4].upper(), arch="resnet18").push(
            "pretrain", run_of(arm_folder.uri)
        )
        assert push_job_metrics(
            "linear-probe", {"top1_ratio": 0.5}, run=run_of(arm_folder.eval("linear_probe"))
        )
    assert push_job_metrics("report", {"report_runs": len(ARMS)}, run=run_of(folder.report))


def _groups(pushgateway: str) -> set[tuple[str, str | None, str | None]]:
    """What the gateway holds, as (job, namespace, run); shards' splits collapse into one."""
    return {
        (group["job"], group.get("namespace"), group.get("run"))
        for group in pushed_groups(pushgateway)
    }


def _run_groups(namespace: str | None, run: str) -> set[tuple[str, str | None, str | None]]:
    return {
        *((job, namespace, f"{run}/{arm}") for job in ("pretrain", "linear-probe") for arm in ARMS),
        ("report", namespace, run),
    }


def test_finished_runs_leave_only_the_outcome_and_the_dataset(
    pushgateway: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSHGATEWAY_URL", pushgateway)
    output_uri = str(tmp_path)
    # Another tenant's run of the same name: its namespace's groups are not this one's.
    monkeypatch.setenv("POD_NAMESPACE", "team-b")
    _push_run(output_uri, "weekly")
    monkeypatch.setenv("POD_NAMESPACE", "team-a")
    for run in ("weekly", "nightly-7", "weekly-2"):
        _push_run(output_uri, run)
    dataset = ("prepare-shards", "team-a", "demo-0a1b2c")
    assert _groups(pushgateway) == {
        dataset,
        ("prepare-shards", "team-b", "demo-0a1b2c"),
        *_run_groups("team-b", "weekly"),
        *_run_groups("team-a", "weekly"),
        *_run_groups("team-a", "nightly-7"),
        *_run_groups("team-a", "weekly-2"),
    }

    record_status(output_uri, "weekly", "kfp-run-1", "SUCCEEDED", "")
    # A failed run is cleaned up too: its outcome (and alert) is what stays.
    record_status(output_uri, "", "Nightly 7", "FAILED", "Task pretrain failed.")

    # weekly-2 is still going (no exit handler yet): its groups stay, though its name starts
    # with a finished run's.
    assert _groups(pushgateway) == {
        ("pipeline", "team-a", None),
        dataset,
        ("prepare-shards", "team-b", "demo-0a1b2c"),
        *_run_groups("team-b", "weekly"),
        *_run_groups("team-a", "weekly-2"),
    }

    record_status(output_uri, "weekly-2", "kfp-run-3", "SUCCEEDED", "")
    assert _groups(pushgateway) == {
        ("pipeline", "team-a", None),
        dataset,
        ("prepare-shards", "team-b", "demo-0a1b2c"),
        *_run_groups("team-b", "weekly"),
    }
    # Nothing left to delete: the second cleanup of a run is a no-op.
    assert delete_run_groups("weekly-2") == 0


def test_cleanup_without_a_namespace_and_with_a_bare_address(
    pushgateway: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.setenv("PUSHGATEWAY_URL", pushgateway)
    _push_run(str(tmp_path), "local")
    # prometheus_client pushes to host:port without a scheme; the cleanup lists there too.
    bare = pushgateway.removeprefix("http://")
    assert delete_run_groups("local", gateway=bare) == len(_run_groups(None, "local"))
    assert _groups(pushgateway) == {("prepare-shards", None, "demo-0a1b2c")}


def test_a_dead_gateway_costs_one_warning_not_the_exit_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("PUSHGATEWAY_URL", dead)
    with caplog.at_level(logging.WARNING, logger="ladder_siam"):
        status = record_status(str(tmp_path), "weekly", "kfp-run-1", "SUCCEEDED", "")
    assert status["state"] == "SUCCEEDED"
    assert (tmp_path / "runs" / "weekly" / "pipeline_status.json").exists()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ladder_siam"):
        assert delete_run_groups("weekly") == 0
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert dead in caplog.records[0].getMessage()
