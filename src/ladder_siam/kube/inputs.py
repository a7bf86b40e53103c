"""The pipeline's first step: validate every parameter, name the run, fingerprint the sources.

It runs in seconds on a CPU pod, uncached, before any GPU is requested: a typo in a URI, a
method name or a batch size that does not divide over the GPUs fails here with every problem
listed, not an hour later on a GPU node.

The fingerprint makes scheduled retraining see new data. It hashes the source listing (keys,
sizes, ETags) and becomes an input of the cached shard-preparation step, so the cache reuses
shards exactly while the data is unchanged. Shards go to ``datasets/<name>-<fingerprint>``:
a run's dataset is never rewritten under it by a later run on newer data.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ladder_siam import IMAGE
from ladder_siam.errors import UsageError
from ladder_siam.io import storage
from ladder_siam.io.uri import SUPPORTED, scheme_problem
from ladder_siam.kube.arms import NOT_NAME, arm_launch, job_name, method_problems, seeds_of
from ladder_siam.kube.launch_config import BACKENDS as JOB_BACKENDS
from ladder_siam.kube.launch_config import LaunchConfig
from ladder_siam.prep.sources import LAYOUTS, fingerprint_source
from ladder_siam.pretrain.config import PretrainConfig, make_config, resolve_preset
from ladder_siam.runtime.run_folder import DATASETS, RunFolder

# Where pretraining runs: a PyTorchJob, a TrainJob, or torchrun on this machine (kfp.local).
BACKENDS = (*JOB_BACKENDS, "local")
_FINGERPRINT_CHARS = 12
# Parallel preparation tasks per source; beyond this, a pod per few shards costs more than it saves.
MAX_PREPARE_PARTS = 256
_NAME_CHARS = 40
# A Kubernetes pod's own namespace, mounted with its service-account token.
_POD_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


# The GPU steps' default placement: A100 nodes, tainted for GPU work only.
A100_NODES = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@dataclass(frozen=True)
class PipelineInputs:
    """The pipeline's parameters: names, types and defaults in one place.

    The pipeline's signature (``pipelines/ladder_siam.py``, which KFP reads for the UI's form)
    takes its defaults from here, and its docstring explains each one; a test checks that the
    pipeline, the ``check-inputs`` component and this class agree.
    """

    data_source_uri: str = "s3://datasets/imagenet-1k"
    data_source_layout: str = "imagefolder"
    data_detection_uri: str = "s3://datasets/coco-2017"
    data_segmentation_uri: str = "s3://datasets/voc-2012-aug"
    data_output_uri: str = "s3://ladder-siam"
    data_shard_size: int = 1000
    data_max_side: int = 0
    data_prepare_workers: int = 8
    data_prepare_parts: int = 1
    pretrain_run_name: str = ""
    pretrain_methods: list[str] = field(default_factory=lambda: ["ladder-byol"])
    pretrain_seeds: list[int] = field(default_factory=lambda: [0])
    pretrain_config: str = "ladder-byol_r50_in1k_200ep"
    pretrain_arch: str = "resnet50"
    pretrain_epochs: int = 200
    pretrain_batch_size: int = 4096
    pretrain_nodes: int = 4
    pretrain_gpus_per_node: int = 8
    pretrain_sync_bn_scope: str = ""
    pretrain_deadline_hours: float = 168.0
    eval_probe_preset: str = "paper"
    eval_detection_preset: str = "coco-1x"
    eval_segmentation_preset: str = "voc"
    eval_detection_gpus: int = 1
    eval_segmentation_gpus: int = 1
    cluster_launch_backend: str = "pytorchjob"
    cluster_image: str = IMAGE
    cluster_namespace: str = ""
    cluster_s3_secret: str = "ladder-siam-s3"
    cluster_service_account: str = ""
    cluster_queue_name: str = ""
    cluster_scheduler: str = "default"
    cluster_priority_class: str = ""
    cluster_pending_timeout_minutes: float = 60.0
    cluster_gpu_node_selector: dict[str, str] = field(default_factory=lambda: dict(A100_NODES))
    cluster_gpu_tolerations: list[dict[str, Any]] = field(
        default_factory=lambda: list(GPU_TOLERATIONS)
    )
    report_compare_runs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DatasetPlan:
    """Where one dataset comes from and where its shards go."""

    source: str
    layout: str
    dest: str
    fingerprint: str
    files: int
    bytes: int


@dataclass(frozen=True)
class RunPlan:
    """What the later steps need: the run's name and folder, and each dataset's plan."""

    run_name: str
    run_uri: str
    datasets: dict[str, DatasetPlan]
    launch: str


def run_name(requested: str, job_name: str) -> str:
    """The run's name: ``requested`` or, when empty, the KFP run's; a DNS-1123 label.

    It names the run's folder, the training job and the ``ladder-siam/run-id`` label, so it is
    lower-cased, stripped to ``[a-z0-9-]`` and kept short enough for a job-name prefix.
    """
    name = NOT_NAME.sub("-", (requested or job_name).lower()).strip("-")
    name = name[:_NAME_CHARS].rstrip("-")
    if not name:
        raise UsageError(f"run_name {requested!r}: has no letters or digits to name a run by")
    return name if name[0].isalpha() else f"run-{name}"[:_NAME_CHARS]


def pod_namespace(requested: str) -> str:
    """``requested``, or the namespace of the pod this runs in (a Kubeflow profile's)."""
    if requested:
        return requested
    if _POD_NAMESPACE.is_file():
        return _POD_NAMESPACE.read_text().strip()
    raise UsageError("namespace: empty, and this is not a Kubernetes pod; name the namespace")


def validate(inputs: PipelineInputs, job_name: str) -> list[str]:
    """Every problem with ``inputs``, each naming the parameter; empty when all are fine."""
    problems = [
        f"{name} {uri!r}: {problem}"
        for name, uri in _uris(inputs)
        if (problem := _uri_problem(uri)) is not None
    ]
    if inputs.cluster_launch_backend not in BACKENDS:
        backend = inputs.cluster_launch_backend
        problems.append(f"cluster_launch_backend {backend!r}: one of {', '.join(BACKENDS)}")
    for name in ("pretrain_deadline_hours", "cluster_pending_timeout_minutes"):
        if getattr(inputs, name) < 0:
            problems.append(f"{name} {getattr(inputs, name)}: 0 (no limit) or more")
    if inputs.data_source_layout not in LAYOUTS:
        problems.append(
            f"data_source_layout {inputs.data_source_layout!r}: one of {', '.join(LAYOUTS)}"
        )
    for name in (
        "data_shard_size", "data_prepare_workers", "data_prepare_parts", "pretrain_epochs",
        "pretrain_batch_size",
        "pretrain_nodes", "pretrain_gpus_per_node",
    ):  # fmt: skip
        if getattr(inputs, name) < 1:
            problems.append(f"{name} {getattr(inputs, name)}: at least 1")
    if inputs.data_prepare_parts > MAX_PREPARE_PARTS:
        parts = inputs.data_prepare_parts
        problems.append(f"data_prepare_parts {parts}: at most {MAX_PREPARE_PARTS}")
    if inputs.data_max_side and inputs.data_max_side < 16:
        problems.append(f"data_max_side {inputs.data_max_side}: 0 (keep sizes) or at least 16 px")
    if inputs.pretrain_config:
        try:
            resolve_preset(inputs.pretrain_config, "pretrain_config")
        except ValueError as error:
            problems.append(str(error))
    problems += _preset_problems(inputs)
    problems += _evaluation_gpu_problems(inputs)
    problems += method_problems(list(inputs.pretrain_methods))
    try:
        seeds = seeds_of(list(inputs.pretrain_seeds))
    except ValueError as error:
        problems.append(str(error))
    problems += [f"report_compare_runs: {problem}" for problem in _compare_run_problems(inputs)]
    if problems:
        return problems
    try:
        name = run_name(inputs.pretrain_run_name, job_name)
    except ValueError as error:
        return [str(error)]
    out = RunFolder.of(inputs.data_output_uri, name).uri
    world_size = inputs.pretrain_nodes * inputs.pretrain_gpus_per_node
    # The trainer's and the launcher's own checks, on the settings every arm will be given.
    try:
        base = launch_config(inputs, name, pretrain_config(inputs, "validate://", out))
    except ValueError as error:
        return [*problems, str(error)]
    for method in inputs.pretrain_methods:
        for seed in seeds:
            arm = arm_launch(base, out, method, seed)
            for check in (partial(arm.pretrain.validate, world_size), arm.validate):
                try:
                    check()
                except ValueError as error:
                    problems.append(str(error))
    return list(dict.fromkeys(problems))


def plan_run(inputs: PipelineInputs, job_name: str) -> RunPlan:
    """Validates ``inputs`` and fingerprints the sources: the first step's whole work.

    Args:
        inputs: The pipeline's parameters.
        job_name: The KFP run's name, which names the run when ``pretrain_run_name`` is empty.

    Returns:
        The run's name and folder and, per dataset, its source, fingerprint and shard folder.

    Raises:
        ValueError: Listing every invalid parameter, or naming a source without files.
    """
    problems = validate(inputs, job_name)
    if problems:
        raise UsageError("invalid pipeline parameters:\n  " + "\n  ".join(problems))
    name = run_name(inputs.pretrain_run_name, job_name)
    sources = {
        "pretrain": (inputs.data_source_uri, inputs.data_source_layout),
        "detection": (inputs.data_detection_uri, "coco"),
        "segmentation": (inputs.data_segmentation_uri, "voc"),
    }
    datasets = {}
    for dataset, (source, layout) in sources.items():
        digest, files, total = fingerprint_source(source)
        fingerprint = digest[:_FINGERPRINT_CHARS]
        folder = NOT_NAME.sub("-", source.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")
        dest = storage.join(inputs.data_output_uri, DATASETS, f"{folder or dataset}-{fingerprint}")
        datasets[dataset] = DatasetPlan(source, layout, dest, fingerprint, files, total)
    uri = RunFolder.of(inputs.data_output_uri, name).uri
    pretrain = pretrain_config(inputs, datasets["pretrain"].dest, uri)
    launch = launch_config(inputs, name, pretrain)
    # As a JSON string, not a KFP dict parameter: a protobuf Struct cannot hold None (an unset
    # deadline, metrics off) and would turn every integer into a float.
    return RunPlan(name, uri, datasets, json.dumps(dataclasses.asdict(launch), sort_keys=True))


def prepare_parts(count: int) -> list[str]:
    """The ``--part`` values of a source prepared by ``count`` tasks: ``["1/3", "2/3", "3/3"]``.

    Empty for one: the committing task then writes every shard itself, as in one go, rather
    than verifying again what a single part task just wrote.
    """
    return [f"{index}/{count}" for index in range(1, count + 1)] if count > 1 else []


def _uris(inputs: PipelineInputs) -> list[tuple[str, str]]:
    named = [
        ("data_source_uri", inputs.data_source_uri),
        ("data_detection_uri", inputs.data_detection_uri),
        ("data_segmentation_uri", inputs.data_segmentation_uri),
        ("data_output_uri", inputs.data_output_uri),
    ]
    return named + [("report_compare_runs", uri) for uri in inputs.report_compare_runs]


def _uri_problem(uri: str) -> str | None:
    if not uri:
        return f"empty; give {SUPPORTED}"
    return scheme_problem(uri)


def _preset_problems(inputs: PipelineInputs) -> list[str]:
    from ladder_siam.evals.detection import config as detection_config
    from ladder_siam.evals.probe import config as probe_config
    from ladder_siam.evals.segmentation import config as segmentation_config

    presets = (
        ("eval_probe_preset", inputs.eval_probe_preset, probe_config.PRESETS),
        ("eval_detection_preset", inputs.eval_detection_preset, detection_config.PRESETS),
        ("eval_segmentation_preset", inputs.eval_segmentation_preset, segmentation_config.PRESETS),
    )
    return [
        f"{name} {value!r}: one of {', '.join(known)}"
        for name, value, known in presets
        if value not in known
    ]


def _evaluation_gpu_problems(inputs: PipelineInputs) -> list[str]:
    """Each evaluation's GPU count against its preset's batch and pretraining's nodes."""
    from ladder_siam.evals.detection.config import PRESETS as DETECTION_PRESETS
    from ladder_siam.evals.segmentation.config import PRESETS as SEGMENTATION_PRESETS
    from ladder_siam.kube.evaluation_jobs import gpu_problems

    presets = {"detection": DETECTION_PRESETS, "segmentation": SEGMENTATION_PRESETS}
    per_node = max(inputs.pretrain_gpus_per_node, 1)  # a bad value is reported on its own
    evaluations = (
        ("eval_detection_gpus", "detection", inputs.eval_detection_preset,
         inputs.eval_detection_gpus),
        ("eval_segmentation_gpus", "segmentation", inputs.eval_segmentation_preset,
         inputs.eval_segmentation_gpus),
    )  # fmt: skip
    return [
        problem
        for name, task, preset, gpus in evaluations
        if preset in presets[task]
        for problem in gpu_problems(name, task, preset, gpus, per_node)
    ]


def _compare_run_problems(inputs: PipelineInputs) -> list[str]:
    from ladder_siam.report.inputs import arms_of_run

    return [
        f"{uri}: neither a run (backbone.json) nor a pipeline run (arms/*/backbone.json)"
        for uri in inputs.report_compare_runs
        if _uri_problem(uri) is None
        and not storage.exists(RunFolder(uri).backbone_info)
        and not arms_of_run(uri)
    ]


def pretrain_config(inputs: PipelineInputs, shards: str, out: str) -> PretrainConfig:
    """The trainer's config: the preset file, overridden by the pipeline's parameters.

    It is the first method's; :func:`~ladder_siam.kube.arms.arm_launch` sets each arm's
    method, seed and folder.

    Raises:
        ValueError: The preset cannot be read, or holds an unknown or mistyped setting.
    """
    overrides: dict[str, Any] = {
        "shards": shards, "out": out, "method": inputs.pretrain_methods[0],
        "arch": inputs.pretrain_arch, "epochs": inputs.pretrain_epochs,
        "batch_size": inputs.pretrain_batch_size,
    }  # fmt: skip
    if inputs.pretrain_sync_bn_scope:  # empty: the preset's
        overrides["sync_bn_scope"] = inputs.pretrain_sync_bn_scope
    return make_config(inputs.pretrain_config or None, **overrides)


def launch_config(inputs: PipelineInputs, name: str, pretrain: PretrainConfig) -> LaunchConfig:
    """The job settings of a run; :func:`~ladder_siam.kube.arms.arm_launch` makes each arm's."""
    local = inputs.cluster_launch_backend == "local"
    deadline = round(inputs.pretrain_deadline_hours * 3600) or None
    return LaunchConfig(
        name=job_name(name, ""),
        namespace="local" if local else pod_namespace(inputs.cluster_namespace),
        image=inputs.cluster_image,
        run_id=name,
        pretrain=pretrain,
        backend="pytorchjob" if local else inputs.cluster_launch_backend,
        nodes=inputs.pretrain_nodes,
        gpus_per_node=inputs.pretrain_gpus_per_node,
        node_selector=dict(inputs.cluster_gpu_node_selector),
        tolerations=tuple(inputs.cluster_gpu_tolerations),
        s3_secret=inputs.cluster_s3_secret or None,
        service_account=inputs.cluster_service_account or None,
        queue_name=inputs.cluster_queue_name or None,
        scheduler=inputs.cluster_scheduler,
        priority_class=inputs.cluster_priority_class or None,
        active_deadline_seconds=deadline,
        pending_timeout_minutes=inputs.cluster_pending_timeout_minutes,
    )
