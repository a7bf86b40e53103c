"""Detection and segmentation evaluations as training jobs, on as many GPUs as pretraining.

The paper's detection protocol (``coco-1x``: 90k iterations of 16 images) takes about a day on
one GPU and a few hours on eight. So on a cluster the evaluation step is a light launcher like
the pretraining step: it runs the finetune as a PyTorchJob or TrainJob of its arm, through the
same :mod:`~ladder_siam.kube.launch` code (hardened pods, Kueue queue and gang, the wait shown,
only its own job adopted, rank 0's log streamed, the job deleted on cancel), under torchrun
across ``gpus`` GPUs. The preset's global batch and learning rate stay as they are and the
per-GPU batch divides, so the recipe does not change with the GPU count; the finetunes score
each val image on one rank and gather the results (see their modules).

Even one GPU goes through a job: KFP fixes a step's resources when the pipeline is compiled,
so a step that held a GPU itself would hold it idle while a bigger job ran, and a job waits
for its GPUs in the cluster's queue like pretraining does. Only ``backend="local"``
(kfp.local) runs a one-process evaluation in the step itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

from ladder_siam.errors import UsageError
from ladder_siam.io import storage
from ladder_siam.kube import launch
from ladder_siam.kube.arms import job_name
from ladder_siam.kube.launch_config import EVALUATION_TASKS, LaunchConfig, task_config
from ladder_siam.runtime.run_folder import metrics_uri

logger = logging.getLogger(__name__)

# An evaluation pod's share of a GPU node, per GPU: its loader workers decode COCO-sized
# images, and Mask R-CNN's targets (full-size masks) fill host memory.
CPU_PER_GPU = 8
MEMORY_GI_PER_GPU = 64
SHM_GI_PER_GPU = 16


def evaluation_shape(gpus: int, gpus_per_node: int) -> tuple[int, int]:
    """``(nodes, GPUs per node)`` of an evaluation on ``gpus`` GPUs, on pretraining's nodes.

    Up to a node's GPUs it is one pod; beyond, whole nodes of ``gpus_per_node``.

    Raises:
        UsageError: ``gpus`` is below 1, or more than a node but not whole nodes.
    """
    if gpus < 1:
        raise UsageError(f"{gpus} GPUs: at least 1")
    if gpus <= gpus_per_node:
        return 1, gpus
    if gpus % gpus_per_node:
        raise UsageError(
            f"{gpus} GPUs: more than a node's {gpus_per_node} must be whole nodes "
            f"(a multiple of {gpus_per_node})"
        )
    return gpus // gpus_per_node, gpus_per_node


def evaluation_args(preset: str, backbone: str, train: str, val: str, out: str) -> list[str]:
    """An evaluation's flags: its preset, the arm's backbone, the dataset's splits, its folder."""
    return [
        "--preset", preset, "--backbone", backbone, "--train", train, "--val", val,
        "--out", out,
    ]  # fmt: skip


def evaluation_job(arm: LaunchConfig, task: str, gpus: int, args: list[str]) -> LaunchConfig:
    """The job that runs ``task`` with ``args`` on ``gpus`` GPUs, for the arm ``arm`` trained.

    It keeps the arm's identity (run, arm and method labels, owner), placement and cluster
    settings; its name is the arm's with the task appended, its pods are sized per GPU.

    Raises:
        UsageError: A bad shape, or a setting of the evaluation that does not hold on these
            GPUs (its batch must divide over them).
    """
    if task not in EVALUATION_TASKS:
        raise UsageError(f"task {task!r}: one of {', '.join(EVALUATION_TASKS)}")
    nodes, per_node = evaluation_shape(gpus, arm.gpus_per_node)
    memory = f"{MEMORY_GI_PER_GPU * per_node}Gi"
    job = dataclasses.replace(
        arm,
        name=job_name(arm.run_id, f"{arm.arm}-{task}" if arm.arm else task),
        task=task,
        task_args=tuple(args),
        nodes=nodes,
        gpus_per_node=per_node,
        cpu_request=str(CPU_PER_GPU * per_node),
        cpu_limit=None,
        memory_request=memory,
        memory_limit=memory,
        shm_size=f"{SHM_GI_PER_GPU * per_node}Gi",
    )
    job.validate()
    job.validate_task()
    return job


def gpu_problems(name: str, task: str, preset: str, gpus: int, gpus_per_node: int) -> list[str]:
    """What is wrong with running ``task``'s ``preset`` on ``gpus`` GPUs, for ``check-inputs``.

    Args:
        name: The pipeline parameter that sets ``gpus``, named in each problem.
        task: ``detection`` or ``segmentation``.
        preset: The evaluation's preset (already known to exist).
        gpus: GPUs of the evaluation.
        gpus_per_node: GPUs of a pretraining node.
    """
    try:
        evaluation_shape(gpus, gpus_per_node)
        placeholders = evaluation_args(preset, "check://", "check://", "check://", "check://")
        task_config(task, placeholders).validate(gpus)
    except UsageError as error:
        return [f"{name} {gpus}: {error}"]
    return []


def run_evaluation(
    task: str, args: list[str], gpus: int, arm: LaunchConfig, backend: str
) -> dict[str, Any]:
    """Runs one evaluation and returns its ``metrics.json``.

    Args:
        task: ``detection`` or ``segmentation``.
        args: Its flags (:func:`evaluation_args`).
        gpus: GPUs (processes, with the ``local`` backend) to run it on.
        arm: The arm's launch settings (those its pretraining ran with).
        backend: ``local`` runs one process here in this process, more under torchrun on
            this machine; otherwise the job is ``arm.backend``'s (PyTorchJob or TrainJob).

    Raises:
        UsageError: A bad setting (before anything runs).
        JobFailedError: The job failed (see :func:`ladder_siam.kube.launch.run`).
    """
    config = task_config(task, args)
    if backend == "local" and gpus == 1:
        return _finetune(task)(config)
    job = evaluation_job(arm, task, gpus, args)
    logger.info("%s of %s on %d GPUs: job %s", task, arm.arm or arm.run_id, gpus, job.name)
    if backend == "local":
        launch.run_local(job)
    else:
        launch.run(job)
    return json.loads(storage.read_text(metrics_uri(config.out)))


def _finetune(task: str) -> Callable[[Any], dict[str, Any]]:
    if task == "detection":
        from ladder_siam.evals.detection.finetune import finetune_detection

        return finetune_detection
    from ladder_siam.evals.segmentation.finetune import finetune_segmentation

    return finetune_segmentation
