"""MLflow tracking (runtime/tracking.py) against a real ``mlflow server`` on loopback."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from crd_schemas import crd_errors
from system_tools import free_port, require_tool, wait_for_port
from test_launch import launch_config

from ladder_siam.errors import UsageError
from ladder_siam.kube.launch import build_job
from ladder_siam.pretrain.config import make_config
from ladder_siam.pretrain.train import pretrain
from ladder_siam.runtime import tracking
from ladder_siam.runtime.train_log import read_train_log


def uses_server(test):
    """Marks a test that needs the module's server: starting it takes 10-30 s."""
    return pytest.mark.integration(pytest.mark.slow(test))


CONFIG = {"method": "ladder-byol", "lr": 0.45, "epochs": 2, "weights": None, "shape": [1, 2]}
LEVELS = ("res2", "res3", "res4", "res5")


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One ``mlflow server`` (sqlite store) for the module; it takes 10-30 s to start."""
    # The dev extra installs it beside this interpreter; PATH need not include the venv.
    server = require_tool(str(Path(sys.executable).parent / "mlflow"))
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    with (root / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [
                server, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--default-artifact-root", str(root / "artifacts"),
            ],
            stdout=log,
            stderr=log,
        )  # fmt: skip
        try:
            wait_for_port(port, timeout=90)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=20)


@pytest.fixture(scope="module")
def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def record(step: int) -> dict[str, float]:
    values = {"step": step, "epoch": step // 10, "lr": 0.1 * step, "tau": 0.99, "loss": 4.0 - step}
    values.update({f"loss_{level}": 1.0 / (step + 1) for level in LEVELS})
    values.update({f"std_{level}": 0.02 for level in LEVELS})
    values.update({"online_probe_top1_res5": 10.0 + step, "images_per_second": 512.0})
    return {**values, "data_wait_fraction": 0.1, "time": 1_700_000_000.0 + step}


@uses_server
def test_pretraining_logs_its_config_and_every_interval_record(tracking_uri: str, client) -> None:
    run = tracking.start_run("pretrain", CONFIG, {tracking.TRACKING_URI: tracking_uri})
    assert run is not None
    records = [record(step) for step in (10, 20, 30)]
    for interval in records:
        run.log_record(interval)
    run.end()

    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "pretrain"
    assert logged.info.experiment_id == "0"
    assert logged.data.params == {
        "method": "ladder-byol", "lr": "0.45", "epochs": "2", "weights": "null", "shape": "[1, 2]",
    }  # fmt: skip
    assert set(logged.data.metrics) == set(records[0]) - {"step", "time"}
    history = client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value, m.timestamp) for m in history] == [
        (r["step"], r["loss"], int(1000 * r["time"])) for r in records
    ]
    assert [m.step for m in client.get_metric_history(run.run_id, "loss_res2")] == [10, 20, 30]


@uses_server
def test_params_are_chunked_and_clipped(tracking_uri: str, client) -> None:
    params = {f"p{index:03d}": index for index in range(250)} | {"long": "x" * 7000}
    run = tracking.start_run("many-params", params, {tracking.TRACKING_URI: tracking_uri})
    assert run is not None
    run.log_metrics({f"m{index}": index for index in range(1001)}, step=3)
    run.end()
    logged = client.get_run(run.run_id).data
    assert len(logged.params) == 251 and logged.params["p249"] == "249"
    assert logged.params["long"] == "x" * tracking.MAX_PARAM_LENGTH
    assert len(logged.metrics) == 1001


@uses_server
def test_a_run_nests_under_the_step_run(tracking_uri: str, client) -> None:
    experiment = client.create_experiment(f"kfp-{uuid.uuid4().hex[:8]}")
    parent = client.create_run(experiment, run_name="pretrain-step").info.run_id
    environ = {tracking.TRACKING_URI: tracking_uri, tracking.PARENT_RUN: parent}
    run = tracking.start_run("pretrain", None, environ)
    assert run is not None
    run.end()
    child = client.get_run(run.run_id)
    assert child.info.experiment_id == experiment
    assert child.data.tags[tracking.PARENT_TAG] == parent


@uses_server
def test_a_run_goes_in_the_named_experiment_created_if_missing(tracking_uri: str, client) -> None:
    name = f"ladder-siam-{uuid.uuid4().hex[:8]}"
    environ = {tracking.TRACKING_URI: tracking_uri, tracking.EXPERIMENT_NAME: name}
    first = tracking.start_run("pretrain", None, environ)
    second = tracking.start_run("pretrain", None, environ)
    assert first is not None and second is not None
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    for run in (first, second):
        assert client.get_run(run.run_id).info.experiment_id == experiment.experiment_id
        run.end()


@uses_server
def test_a_run_that_raised_ends_failed_and_a_nan_is_kept(tracking_uri: str, client) -> None:
    run = tracking.start_run("pretrain", None, {tracking.TRACKING_URI: tracking_uri})
    assert run is not None
    run.log_record({"step": 5, "loss": math.nan, "time": time.time()})
    run.end(failed=True)
    run.end()  # a second end changes nothing
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FAILED"
    assert math.isnan(logged.data.metrics["loss"])


@uses_server
def test_an_evaluation_logs_its_scalars(tracking_uri: str, client) -> None:
    experiment = client.create_experiment(f"eval-{uuid.uuid4().hex[:8]}")
    parent = client.create_run(experiment).info.run_id
    environ = {tracking.TRACKING_URI: tracking_uri, tracking.PARENT_RUN: parent}
    scalars = {"top1_res5": 61.5, "top1_res4": 48.0, "backbone": "resnet18", "ok": True}
    assert tracking.log_scalars("linear-probe", scalars, {"epochs": 90}, environ)

    [run] = client.search_runs([experiment], f"tags.{tracking.PARENT_TAG} = '{parent}'")
    assert run.info.run_name == "linear-probe" and run.info.status == "FINISHED"
    assert run.data.metrics == {"top1_res5": 61.5, "top1_res4": 48.0}
    assert run.data.params == {"epochs": "90"}


@uses_server
def test_a_dead_server_costs_one_warning_and_no_time(
    caplog: pytest.LogCaptureFixture, tracking_uri: str
) -> None:
    dead = {tracking.TRACKING_URI: f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        assert tracking.start_run("pretrain", CONFIG, dead) is None
        assert not tracking.log_scalars("linear-probe", {"top1": 1.0}, None, dead)
    assert time.monotonic() - started < 5
    assert len(caplog.records) == 2  # one per run that could not be opened
    assert all("not tracking" in entry.getMessage() for entry in caplog.records)


@uses_server
def test_a_server_that_dies_mid_run_costs_one_warning(
    caplog: pytest.LogCaptureFixture, tracking_uri: str
) -> None:
    run = tracking.start_run("pretrain", None, {tracking.TRACKING_URI: tracking_uri})
    assert run is not None
    # The same client pointed at a closed port, as if the server went away after the start.
    from mlflow.tracking import MlflowClient

    run._client = MlflowClient(f"http://127.0.0.1:{free_port()}")
    caplog.clear()  # the start's own line, when an earlier test left the loggers at INFO
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        for step in range(1, 50):
            run.log_record(record(step))
        run.end()
    assert time.monotonic() - started < 5
    assert len(caplog.records) == 1 and "tracking stops" in caplog.records[0].getMessage()
    assert not run.active


def test_only_non_secret_variables_are_forwarded() -> None:
    environ = {
        "MLFLOW_TRACKING_URI": "http://mlflow.kubeflow:5000",
        "MLFLOW_RUN_ID": "abc",
        "MLFLOW_EXPERIMENT_NAME": "",
        "MLFLOW_TRACKING_TOKEN": "secret",
        "MLFLOW_TRACKING_PASSWORD": "secret",
    }
    assert tracking.forwarded_env(environ) == {
        "MLFLOW_TRACKING_URI": "http://mlflow.kubeflow:5000",
        "MLFLOW_RUN_ID": "abc",
    }


def training_env(job: dict) -> list[list[dict]]:
    """The env list of every training container of a PyTorchJob or TrainJob (None: none)."""
    if job["kind"] == "TrainJob":
        return [job["spec"]["trainer"].get("env")]
    replicas = job["spec"]["pytorchReplicaSpecs"].values()
    return [r["template"]["spec"]["containers"][0].get("env") for r in replicas]


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_both_job_kinds_hand_the_variables_to_the_training_container(backend: str) -> None:
    variables = {"MLFLOW_TRACKING_URI": "http://mlflow.kubeflow:5000", "MLFLOW_RUN_ID": "abc"}
    job = build_job(launch_config(backend=backend, tracking_env=variables))
    assert crd_errors(job) == []
    for env in training_env(job):
        assert {entry["name"]: entry["value"] for entry in env if "value" in entry} == variables
    # Without them the manifests stay as they were: no env list at all.
    untracked = build_job(launch_config(backend=backend, s3_secret=None))
    assert training_env(untracked) in ([None], [None, None])


def test_a_credential_never_rides_in_a_manifest() -> None:
    with pytest.raises(UsageError, match="MLFLOW_TRACKING_TOKEN"):
        launch_config(tracking_env={"MLFLOW_TRACKING_TOKEN": "secret"}).validate()


def test_without_the_variable_nothing_is_imported_or_logged() -> None:
    # A fresh interpreter: this module's server fixture has imported mlflow here already.
    probe = (
        "import sys\n"
        "from ladder_siam.runtime import tracking\n"
        "assert tracking.start_run('pretrain', {'a': 1}, {}) is None\n"
        "assert tracking.log_scalars('probe', {'top1': 1.0}, None, {}) is False\n"
        "assert not any(name.split('.')[0] == 'mlflow' for name in sys.modules), 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=Path(__file__).parent)


@uses_server
def test_a_pretraining_run_logs_what_its_train_log_holds(
    tracking_uri: str, client, shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = client.create_run("0", run_name="kfp step").info.run_id
    monkeypatch.setenv(tracking.TRACKING_URI, tracking_uri)
    monkeypatch.setenv(tracking.PARENT_RUN, parent)
    config = make_config(
        "tiny_cpu", shards=shards, out=str(tmp_path / "run"), max_steps=4, log_every=2,
        checkpoint_every=4, workers=0, metrics_port=None, image_size=24,
    )  # fmt: skip
    pretrain(config)

    [run] = client.search_runs(["0"], f"tags.mlflow.parentRunId = '{parent}'")
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain ladder-byol s0"
    assert run.data.params["arch"] == config.arch and run.data.params["max_steps"] == "4"
    log = read_train_log(config.out)
    # The same names as train_log.jsonl, one point per interval at its step.
    assert set(run.data.metrics) == set(log[0]) - {"step", "time"}
    history = client.get_metric_history(run.info.run_id, "loss_res5")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss_res5"]) for r in log]
