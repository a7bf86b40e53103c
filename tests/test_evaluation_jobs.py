"""Detection and segmentation evaluations as training jobs: their shape, their manifests
against the vendored CRD schemas (PyTorchJob v1, TrainJob v2.3), ``launch render-eval``, and
the pipeline step that submits one to a fake Kubernetes API and reads back its metrics.

The local backend's two-process run is in ``test_detection.py`` (it needs that module's data).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from crd_schemas import crd_errors
from fake_kubernetes import Script, fake_kubernetes
from kubernetes.config import kube_config
from test_launch import launch_config

from ladder_siam import cli
from ladder_siam.errors import UsageError
from ladder_siam.kube import steps
from ladder_siam.kube.evaluation_jobs import (
    evaluation_args,
    evaluation_job,
    evaluation_shape,
    gpu_problems,
)
from ladder_siam.kube.launch import build_job
from ladder_siam.kube.launch_config import OWNER_LABEL, LaunchConfig
from ladder_siam.runtime.run_folder import RunFolder

IMAGE = "registry.example.com/ladder-siam:0.1.0"
RUN = "s3://ladder-siam/runs/r50/arms/ladder-byol-s0"


def arm(**overrides: object) -> LaunchConfig:
    """An arm of a pipeline run as the evaluation step receives it: 4 nodes of 8 GPUs."""
    settings: dict[str, object] = {
        "name": "ladder-siam-r50-ladder-byol-s0", "run_id": "r50", "arm": "ladder-byol-s0",
        "owner": "kfp-run-7", "queue_name": "team-a", "scheduler": "volcano",
    }  # fmt: skip
    return launch_config(**{**settings, **overrides})


def detection_args(out: str = f"{RUN}/eval/detection") -> list[str]:
    coco = "s3://ladder-siam/datasets/coco-1a2b3c"
    return evaluation_args("coco-1x", f"{RUN}/backbone.pt", coco, coco, out)


@pytest.mark.parametrize(
    ("gpus", "per_node", "shape"),
    [(1, 8, (1, 1)), (4, 8, (1, 4)), (8, 8, (1, 8)), (16, 8, (2, 8)), (8, 4, (2, 4))],
)
def test_an_evaluation_fills_one_node_then_whole_nodes(
    gpus: int, per_node: int, shape: tuple[int, int]
) -> None:
    assert evaluation_shape(gpus, per_node) == shape


@pytest.mark.parametrize(
    ("gpus", "per_node", "message"),
    [(0, 8, "0 GPUs: at least 1"), (12, 8, "12 GPUs: more than a node's 8 must be whole")],
)
def test_a_shape_that_cannot_be_placed_is_named(gpus: int, per_node: int, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        evaluation_shape(gpus, per_node)


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_an_arms_detection_job_runs_the_finetune_on_its_gpus_and_matches_the_crd(
    backend: str,
) -> None:
    base = arm(backend=backend)
    job = build_job(evaluation_job(base, "detection", 8, detection_args()))
    assert crd_errors(job) == []
    labels = job["metadata"]["labels"]
    assert job["metadata"]["name"] == "ladder-siam-r50-ladder-byol-s0-detection"
    # The arm's identity: dashboards, kubectl -l and a retried step's adoption select on it.
    assert labels["app.kubernetes.io/component"] == "detection"
    assert (labels["ladder-siam/arm"], labels["ladder-siam/method"]) == ("ladder-byol-s0",
                                                                         "ladder-byol")  # fmt: skip
    assert (labels[OWNER_LABEL], labels["kueue.x-k8s.io/queue-name"]) == ("kfp-run-7", "team-a")
    text = json.dumps(job)
    command = [
        "torchrun", "--nnodes", "1", "--nproc-per-node", "8", "--max-restarts", "3",
        "-m", "ladder_siam.evals.detection.finetune", *detection_args(),
    ]  # fmt: skip
    assert json.dumps(command)[1:-1] in text
    if backend == "pytorchjob":
        [master] = job["spec"]["pytorchReplicaSpecs"].values()  # one node: no workers
        pod = master["template"]["spec"]
        [container] = pod["containers"]
        assert container["resources"]["requests"] == {
            "cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"
        }  # fmt: skip
        assert "ports" not in container  # only pretraining serves metrics
        assert pod["schedulerName"] == "volcano"
        assert job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == 1
    else:
        trainer = job["spec"]["trainer"]
        assert (trainer["numNodes"], trainer["numProcPerNode"]) == (1, 8)


def test_sixteen_gpus_are_two_of_the_arms_nodes() -> None:
    voc = "s3://ladder-siam/datasets/voc-1a2b3c"
    args = evaluation_args("voc", f"{RUN}/backbone.pt", voc, voc, f"{RUN}/eval/segmentation")
    job = build_job(evaluation_job(arm(), "segmentation", 16, args))
    assert crd_errors(job) == []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 1)
    assert job["spec"]["nprocPerNode"] == "8"


def test_a_batch_that_does_not_divide_over_the_gpus_fails_before_any_job() -> None:
    # coco-1x trains 16 images a step; 3 GPUs would change the recipe.
    with pytest.raises(UsageError, match="--batch-size 16: must be divisible by world size 3"):
        evaluation_job(arm(), "detection", 3, detection_args())
    # check-inputs says so for the pipeline's parameter, before anything runs.
    [problem] = gpu_problems("eval_detection_gpus", "detection", "coco-1x", 3, 8)
    assert problem.startswith("eval_detection_gpus 3: ") and "world size 3" in problem
    assert gpu_problems("eval_segmentation_gpus", "segmentation", "cityscapes", 8, 8) == []
    # mmseg's Cityscapes recipe is 8 images a step: two nodes of 8 GPUs are too many.
    [problem] = gpu_problems("eval_segmentation_gpus", "segmentation", "cityscapes", 16, 8)
    assert "world size 16" in problem


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_launch_render_eval_prints_exactly_the_job_the_launcher_creates(
    backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = [
        "launch", "render-eval", "--backend", backend, "--run-name", "r50-det",
        "--gpus-per-node", "8", "--image", IMAGE, "--namespace", "ml-research",
        "detection", *detection_args(),
    ]  # fmt: skip
    assert cli.main(flags) == 0
    rendered = yaml.safe_load(capsys.readouterr().out)
    assert crd_errors(rendered) == []
    expected = LaunchConfig(
        name="r50-det", namespace="ml-research", image=IMAGE, run_id="r50-det",
        task="detection", task_args=tuple(detection_args()), backend=backend,
        s3_secret="ladder-siam-s3",
    )  # fmt: skip
    assert rendered == build_job(expected)
    # Launched by hand, it evaluates some backbone: no method label pretends to know which.
    assert "ladder-siam/method" not in rendered["metadata"]["labels"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gpus-per-node", "3"], "--batch-size 16: must be divisible by world size 3"),
        (["--bogus", "1"], "detection flags: unknown --bogus 1"),
        (["--iterations", "many"], "argument --iterations: invalid int value: 'many'"),
    ],
)
def test_launch_render_eval_names_what_cannot_run(
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    job_flags = ["--run-name", "r1", "--image", IMAGE]
    eval_flags = detection_args()
    if extra[0] == "--gpus-per-node":
        job_flags += extra
    else:
        eval_flags += extra
    assert cli.main(["launch", "render-eval", *job_flags, "detection", *eval_flags]) == 2
    assert capsys.readouterr().out == ""
    assert message in caplog.text


class Metrics:
    """The part of KFP's Metrics artifact the step writes."""

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_metric(self, metric: str, value: float) -> None:
        self.logged[metric] = value


def test_the_pipeline_step_submits_the_arms_job_once_and_reads_its_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = RunFolder(str(tmp_path / "runs" / "r50" / "arms" / "ladder-byol-s0"))
    out = Path(folder.eval("detection"))
    out.mkdir(parents=True)
    # What the job leaves behind, which the step reads once the job succeeded.
    written = {"val_images": 5000, "scalars": {"box_AP": 38.9, "mask_AP": 35.2}}
    (out / "metrics.json").write_text(json.dumps(written))
    model = SimpleNamespace(path="", metadata={"uri": f"{folder.uri}/backbone.pt",
                                               "run_uri": folder.uri})  # fmt: skip
    dataset = SimpleNamespace(path="", metadata={"uri": str(tmp_path / "datasets" / "coco")})
    launch = json.dumps(dataclasses.asdict(arm(owner="")))
    metrics = Metrics()
    with fake_kubernetes(Script("Succeeded", after_polls=0)) as (cluster, api):
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": api.configuration.host}}],
            "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))  # fmt: skip
        # The client read $KUBECONFIG when it was imported; point its default there.
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        with caplog.at_level(logging.INFO, logger="ladder_siam"):
            result = steps.run_evaluation(
                "detection", model, dataset, "coco-1x", 8, launch, "pytorchjob", "kfp-run-9",
                metrics,
            )  # fmt: skip
    assert result == written and metrics.logged == written["scalars"]
    [job] = cluster.jobs.values()
    assert cluster.created == 1 and crd_errors(job) == []
    # Labelled with this KFP run, which a retried step adopts; the arm's queue and gang.
    assert job["metadata"]["labels"][OWNER_LABEL] == "kfp-run-9"
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["command"][-2:] == ["--out", str(out)]
    assert "detection of ladder-byol-s0 on 8 GPUs" in caplog.text
