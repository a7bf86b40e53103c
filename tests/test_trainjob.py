"""The Kubeflow Trainer v2 backend: the TrainJob against the v2.3.0 CRD schema, its runtime
reference and patches, the ``launch render`` command, and a whole TrainJob followed through the
fake API server."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml
from crd_schemas import crd_errors
from fake_kubernetes import Script, fake_kubernetes
from test_launch import PAPER, launch_config

from ladder_siam import cli
from ladder_siam.io.s3 import CREDENTIAL_VARIABLES
from ladder_siam.kube.launch import TRAINJOB, Launcher, build_job, run
from ladder_siam.kube.launch_config import SCHEDULERS
from ladder_siam.kube.pytorchjob import build_pytorchjob
from ladder_siam.kube.trainjob import build_trainjob, runtime_name

REPO = Path(__file__).parents[1]
IMAGE = "registry.example.com:5000/ladder-siam:0.1.0"


def pod_patch(job: dict) -> dict:
    [patch] = job["spec"]["runtimePatches"]
    [node] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    return node["template"]["spec"]["template"]


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_a_trainjob_runs_the_same_command_on_its_scheduler_runtime(scheduler: str) -> None:
    config = launch_config(backend="trainjob", scheduler=scheduler, queue_name="team-a")
    job = build_trainjob(config)
    assert crd_errors(job) == []
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
        "name": runtime_name(scheduler),
    }  # fmt: skip
    trainer = job["spec"]["trainer"]
    # The same torchrun command and pod shape as the PyTorchJob of the same settings.
    pytorch = build_pytorchjob(dataclasses.replace(config, backend="pytorchjob"))
    master = pytorch["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert trainer["command"] == master["containers"][0]["command"]
    assert trainer["resourcesPerNode"] == master["containers"][0]["resources"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (4, 8, IMAGE)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    # Pods are labelled and placed as the PyTorchJob's are.
    pod = pod_patch(job)
    assert pod["metadata"]["labels"] == config.labels()
    assert pod["spec"]["nodeSelector"] == master["nodeSelector"]
    assert pod["spec"]["tolerations"] == master["tolerations"]
    # Credentials by reference only, each key optional (an AWS Secret has no endpoint).
    assert trainer["env"] == [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": key,
                                                     "optional": True}}}
        for key in CREDENTIAL_VARIABLES
    ]  # fmt: skip
    assert job["spec"]["activeDeadlineSeconds"] == 3 * 86400


def test_without_a_secret_the_pods_use_the_cloud_identity_of_their_service_account() -> None:
    config = launch_config(s3_secret=None, service_account="ladder-siam-irsa")
    pytorch = build_pytorchjob(config)
    assert crd_errors(pytorch) == []
    for replica in pytorch["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["serviceAccountName"] == "ladder-siam-irsa"
        assert "envFrom" not in pod["containers"][0] and "env" not in pod["containers"][0]
        # The identity's web token is projected by its webhook, not through the API token.
        assert pod["automountServiceAccountToken"] is False
    trainjob = build_trainjob(dataclasses.replace(config, backend="trainjob"))
    assert crd_errors(trainjob) == []
    assert "env" not in trainjob["spec"]["trainer"]
    assert pod_patch(trainjob)["spec"]["serviceAccountName"] == "ladder-siam-irsa"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"priority_class": "training"}, "priority_class: a TrainJob's pods"),
        ({"pretrain": dataclasses.replace(PAPER, metrics_port=9500)}, "metrics_port 9500"),
    ],
)
def test_settings_a_trainjob_cannot_carry_are_refused(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_trainjob(launch_config(backend="trainjob", **overrides))


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_launch_render_prints_exactly_the_job_the_launcher_creates(
    backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = [
        "launch", "render", "--backend", backend, "--run-name", "r50-ladder", "--nodes", "4",
        "--gpus-per-node", "8", "--image", IMAGE, "--shards", "s3://datasets/in1k",
        "--out", "s3://runs/r50-ladder", "--queue-name", "team-a", "--scheduler", "volcano",
        "--service-account", "ladder-siam-irsa", "--namespace", "ml-research",
        "--config", "ladder-byol_r50_in1k_200ep",
        "--batch-size", "2048", "--epochs", "100",
    ]  # fmt: skip
    assert cli.main(flags) == 0
    rendered = yaml.safe_load(capsys.readouterr().out)
    assert crd_errors(rendered) == []
    pretrain = dataclasses.replace(
        PAPER, shards="s3://datasets/in1k", out="s3://runs/r50-ladder", batch_size=2048,
        epochs=100,
    )  # fmt: skip
    expected = launch_config(
        backend=backend, name="r50-ladder", run_id="r50-ladder", image=IMAGE, pretrain=pretrain,
        s3_secret="ladder-siam-s3", service_account="ladder-siam-irsa", queue_name="team-a",
        scheduler="volcano", node_selector={}, tolerations=(), active_deadline_seconds=None,
    )  # fmt: skip
    assert rendered == build_job(expected)


def test_launch_render_names_a_setting_that_cannot_run(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    flags = [
        "launch", "render", "--run-name", "r1", "--nodes", "3", "--gpus-per-node", "8",
        "--image", IMAGE, "--shards", "s3://d", "--out", "s3://o", "--batch-size", "4096",
    ]  # fmt: skip
    assert cli.main(flags) == 2
    assert capsys.readouterr().out == ""
    assert "--batch-size 4096: must be divisible by world size 24" in caplog.text


def test_a_trainjob_is_followed_to_completion_with_its_rank_0_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lines = [f"step {i}" for i in range(4)]
    config = launch_config(backend="trainjob", nodes=2)
    with fake_kubernetes(Script("Succeeded", after_polls=3, log_lines=lines)) as (cluster, api):
        caplog.set_level(logging.INFO, logger="ladder_siam.kube.launch")
        run(config, Launcher("ml-research", api, TRAINJOB), poll_s=0.01)
    [job] = cluster.jobs.values()
    assert job["kind"] == "TrainJob" and cluster.created == 1 and cluster.deleted == []
    logged = [r.getMessage() for r in caplog.records if " rank 0] " in r.getMessage()]
    assert logged == [f"[{config.name} rank 0] {line}" for line in lines]
    # The rank-0 pod is found by JobSet's labels: the TrainJob's name and completion index 0.
    selector = "jobset.sigs.k8s.io%2Fjobset-name%3Dladder-byol-r50-200ep%2Cbatch.kubernetes.io"
    assert any(selector in request for request in cluster.requests)
