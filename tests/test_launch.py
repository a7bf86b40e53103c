"""Launching pretraining: the PyTorchJob against the real CRD schema, the Kubernetes API calls
against a fake API server (real HTTP, real client), and the local torchrun backend."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import signal
import threading
from pathlib import Path
from types import FrameType

import kubernetes_validate
import pytest
import torch
from crd_schemas import crd_errors
from fake_kubernetes import Script, fake_kubernetes

from ladder_siam.kube.launch import (
    KINDS,
    JobCancelledError,
    JobFailedError,
    Launcher,
    run,
    run_local,
)
from ladder_siam.kube.launch_config import LaunchConfig
from ladder_siam.kube.pytorchjob import build_pytorchjob
from ladder_siam.nets.backbones import torchvision_resnet
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.pretrain.config import config_from_args, make_config
from ladder_siam.pretrain.train import get_args_parser

TINY = "tiny_cpu"  # a preset shipped with the package
DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
LABEL_KEY = re.compile(r"([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
SECRET_VALUE = "wJalrXUtnFEMI-not-a-real-key"


PAPER = make_config(
    "ladder-byol_r50_in1k_200ep", shards="s3://datasets/in1k", out="s3://runs/r50-200ep-a1"
)


def launch_config(**overrides: object) -> LaunchConfig:
    settings: dict[str, object] = {
        "name": "ladder-byol-r50-200ep", "namespace": "ml-research",
        "image": "registry.example.com:5000/ladder-siam:0.1.0", "run_id": "r50-200ep-a1",
        "pretrain": PAPER, "nodes": 4, "gpus_per_node": 8,
        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
        "s3_secret": "s3-credentials", "active_deadline_seconds": 3 * 86400,
    }  # fmt: skip
    settings.update(overrides)
    return LaunchConfig(**settings)  # type: ignore[arg-type]


def test_four_node_job_matches_the_crd_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    job = build_pytorchjob(launch_config())
    assert crd_errors(job) == []
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")

    # The schema leaves metadata open ("type: object"): check the name and labels ourselves.
    metadata = job["metadata"]
    assert DNS_1123_LABEL.fullmatch(metadata["name"]) and metadata["namespace"] == "ml-research"
    assert metadata["labels"]["ladder-siam/run-id"] == "r50-200ep-a1"
    assert metadata["labels"]["app.kubernetes.io/component"] == "pretrain"
    for key, value in metadata["labels"].items():
        assert LABEL_KEY.fullmatch(key) and LABEL_VALUE.fullmatch(value), (key, value)

    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    assert spec["nprocPerNode"] == "8"
    assert spec["runPolicy"] == {
        "cleanPodPolicy": "None", "backoffLimit": 3, "activeDeadlineSeconds": 259200,
        "ttlSecondsAfterFinished": 604800,
    }  # fmt: skip
    for replica in replicas.values():
        pod = replica["template"]
        assert pod["metadata"]["labels"] == metadata["labels"]
        assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert pod["spec"]["volumes"] == [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "100Gi"}},
        ]
        # Hardened: Istio off, no API token, non-root with seccomp, read-only root, no caps.
        assert pod["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "Pod", **pod}, "1.32", strict=True
        )
        (container,) = pod["spec"]["containers"]
        assert container["name"] == "pytorch"
        assert not container["image"].endswith(":latest")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        command = container["command"]
        # A dead worker restarts the node's workers from the newest checkpoint, 3 times at most.
        assert command[:10] == [
            "torchrun", "--nnodes", "4", "--nproc-per-node", "8", "--max-restarts", "3",
            "-m", "ladder_siam.pretrain", "--config-json",
        ]  # fmt: skip
        # The pods get the resolved config as typed data, which the trainer reads back whole.
        [config_json] = command[10:]
        assert config_from_args(get_args_parser().parse_args(["--config-json", config_json])) == (
            PAPER
        )
        assert pod["metadata"]["labels"]["ladder-siam/method"] == PAPER.method
        assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
        assert container["volumeMounts"] == [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ]
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        # Credentials come only by reference to the Secret, never as values.
        assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
        assert "env" not in container
    assert SECRET_VALUE not in json.dumps(job)


def test_the_schema_check_catches_a_broken_job() -> None:
    job = copy.deepcopy(build_pytorchjob(launch_config()))
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "three"
    job["spec"]["runPolicy"]["backoffLimit"] = "3"
    job["spec"]["runPolicy"]["backofLimit"] = 3
    assert len(crd_errors(job)) == 3


@pytest.mark.parametrize(
    ("scheduler", "scheduler_name"),
    [("volcano", "volcano"), ("scheduler-plugins", "scheduler-plugins-scheduler")],
)
def test_a_gang_scheduled_job_starts_all_its_pods_or_none(
    scheduler: str, scheduler_name: str
) -> None:
    job = build_pytorchjob(
        launch_config(scheduler=scheduler, queue_name="gpu-research", priority_class="training")
    )
    assert crd_errors(job) == []
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {
        "minAvailable": 4, "queue": "gpu-research", "priorityClass": "training",
    }  # fmt: skip
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-research"
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["schedulerName"] == scheduler_name
        assert pod["priorityClassName"] == "training"


def test_the_default_scheduler_sends_no_gang_and_kueue_needs_only_the_label() -> None:
    job = build_pytorchjob(launch_config(queue_name="team-a"))
    assert crd_errors(job) == []
    assert "schedulingPolicy" not in job["spec"]["runPolicy"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "schedulerName" not in pod and "priorityClassName" not in pod
    plain = build_pytorchjob(launch_config())
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]


def test_single_node_job_has_no_workers_and_digest_images_are_pinned() -> None:
    image = "ghcr.io/acme/ladder-siam@sha256:" + "ab" * 32
    job = build_pytorchjob(launch_config(nodes=1, gpus_per_node=2, image=image, s3_secret=None))
    assert crd_errors(job) == []
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["command"][:5] == ["torchrun", "--nnodes", "1", "--nproc-per-node", "2"]
    assert container["image"] == image and "envFrom" not in container


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"nodes": 0}, "nodes 0"),
        ({"name": "Ladder_Run"}, "name 'Ladder_Run'"),
        ({"namespace": "ml research"}, "namespace 'ml research'"),
        ({"image": "registry.example.com/ladder-siam:latest"}, "pin a tag"),
        ({"image": "registry.example.com:5000/ladder-siam"}, "pin a tag"),
        ({"image": "ladder-siam@sha256:abc"}, "sha256:<64 hex digits>"),
        ({"run_id": "run 1!"}, "run_id 'run 1!'"),
        ({"node_selector": {"pool": "gpu nodes"}}, "node_selector pool="),
        ({"memory_limit": "lots"}, "memory_limit 'lots'"),
        ({"scheduler": "yunikorn"}, "scheduler 'yunikorn': one of default, volcano"),
        ({"queue_name": "Team A"}, "queue_name 'Team A'"),
        ({"pretrain": dataclasses.replace(PAPER, metrics_port=70000)}, "metrics_port 70000"),
        ({"pretrain": dataclasses.replace(PAPER, method="GG?G")}, "method 'GG?G'"),
        ({"backend": "slurm"}, "backend 'slurm': one of pytorchjob, trainjob"),
        ({"service_account": "Trainer SA"}, "service_account 'Trainer SA'"),
        ({"owner": "run 7"}, "owner 'run 7'"),
        ({"max_restarts": -1}, "max_restarts -1"),
        ({"pending_timeout_minutes": -5}, "pending_timeout_minutes -5"),
    ],
)
def test_invalid_settings_are_named(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build_pytorchjob(launch_config(**overrides))


def master_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " rank 0] " in r.getMessage()]


def test_wait_returns_on_success_and_streams_each_log_line_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lines = [f"step {i} loss {1 / (i + 1):.3f}" for i in range(6)]
    with fake_kubernetes(Script("Succeeded", after_polls=4, log_lines=lines)) as (cluster, api):
        launcher = Launcher("ml-research", api)
        caplog.set_level(logging.INFO, logger="ladder_siam.kube.launch")
        name = launcher.submit(build_pytorchjob(launch_config()))
        launcher.wait(name, timeout_s=10, poll_s=0.01)
    assert name == "ladder-byol-r50-200ep" and name in cluster.jobs
    assert cluster.polls == 5
    assert master_lines(caplog) == [f"[{name} rank 0] {line}" for line in lines[:5]]
    selector = "labelSelector=training.kubeflow.org%2Fjob-name%3Dladder-byol-r50-200ep%2C"
    assert any(selector in request for request in cluster.requests)
    assert cluster.deleted == []


def test_a_failed_job_raises_with_the_reason_and_the_master_log() -> None:
    lines = ["step 10 loss 0.912", "step 20 loss 0.874", "RuntimeError: CUDA out of memory"]
    script = Script(
        "Failed", after_polls=2, reason="PyTorchJobFailed",
        message="PyTorchJob ladder-byol-r50-200ep is failed because 1 Master replica(s) failed.",
        log_lines=lines,
    )  # fmt: skip
    with fake_kubernetes(script) as (_, api):
        launcher = Launcher("ml-research", api)
        name = launcher.submit(build_pytorchjob(launch_config()))
        with pytest.raises(JobFailedError) as failure:
            launcher.wait(name, timeout_s=10, poll_s=0.01)
    assert failure.value.reason == "PyTorchJobFailed"
    assert failure.value.log_tail == lines
    assert "PyTorchJobFailed" in str(failure.value) and "1 Master replica(s) failed" in str(
        failure.value
    )
    assert str(failure.value).endswith("RuntimeError: CUDA out of memory")


def test_a_retried_step_follows_its_job_and_replaces_a_failed_one() -> None:
    with fake_kubernetes(Script("Succeeded", after_polls=2)) as (cluster, api):
        launcher = Launcher("ml-research", api)
        first = launcher.submit(build_pytorchjob(launch_config()))
        # KFP retried the step: the job is still running, so it is followed, not restarted.
        again = launcher.submit(build_pytorchjob(launch_config()))
        launcher.wait(again, timeout_s=10, poll_s=0.01)
    assert first == again and cluster.created == 1 and cluster.deleted == []

    with fake_kubernetes(Script("Failed", after_polls=0, reason="OOMKilled")) as (cluster, api):
        launcher = Launcher("ml-research", api)
        name = launcher.submit(build_pytorchjob(launch_config()))
        # Started again after a failure: a new job, which resumes from the checkpoints.
        assert launcher.submit(build_pytorchjob(launch_config())) == name
    assert cluster.created == 2 and cluster.deleted == [name] and name in cluster.jobs


def test_a_hanging_job_times_out_and_is_deleted() -> None:
    with fake_kubernetes(Script(outcome=None)) as (cluster, api):
        launcher = Launcher("ml-research", api)
        name = launcher.submit(build_pytorchjob(launch_config()))
        with pytest.raises(TimeoutError, match=name):
            launcher.wait(name, timeout_s=0.3, poll_s=0.05)
    assert cluster.deleted == [name] and cluster.jobs == {}
    assert any("propagationPolicy=Background" in request for request in cluster.requests)


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_sigterm_during_run_deletes_the_job_and_restores_the_handler(backend: str) -> None:
    received: list[int] = []

    def stand_in(signum: int, frame: FrameType | None) -> None:
        received.append(signum)  # never let a missed handler terminate pytest

    original = signal.signal(signal.SIGTERM, stand_in)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        with fake_kubernetes(Script(outcome=None)) as (cluster, api):
            timer.start()
            with pytest.raises(JobCancelledError, match="ladder-byol-r50-200ep"):
                launcher = Launcher("ml-research", api, KINDS[backend])
                run(launch_config(backend=backend), launcher, timeout_s=20, poll_s=0.05)
        assert signal.getsignal(signal.SIGTERM) is stand_in
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, original)
    assert received == []
    assert cluster.deleted == ["ladder-byol-r50-200ep"] and cluster.polls >= 2


@pytest.mark.slow
@pytest.mark.integration
def test_run_local_trains_with_torchrun(tmp_path: Path) -> None:
    make_demo_data(str(tmp_path / "raw"), images=60, size=32)
    prepare_shards(str(tmp_path / "raw" / "imagefolder"), str(tmp_path / "shards"), shard_size=30)
    out = tmp_path / "run"
    pretrain = make_config(
        TINY, shards=str(tmp_path / "shards"), out=str(out), max_steps=2, batch_size=16,
        hidden_dim=32, projection_dim=16, dense_dim=8, workers=0, metrics_port=None,
    )  # fmt: skip
    run_local(launch_config(nodes=1, gpus_per_node=1, pretrain=pretrain))
    state = torch.load(out / "backbone.pt", weights_only=True)
    torchvision_resnet("resnet18", small_input=True).load_state_dict(state)
