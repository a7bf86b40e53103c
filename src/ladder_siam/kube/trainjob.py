"""The Kubeflow Trainer v2 TrainJob (``trainer.kubeflow.org/v1alpha1``) of a pretraining run.

A TrainJob names a TrainingRuntime and says only what differs per run: image, command, nodes,
GPUs and resources per node, credentials, MLflow variables, labels and placement. The hardened
pod template (security contexts, ``/tmp`` and ``/dev/shm``, Istio off, the metrics port,
restarts) lives in the runtime that ``k8s/trainer`` ships, one per gang scheduler:
``ladder-siam`` for the default scheduler, ``ladder-siam-volcano`` and
``ladder-siam-scheduler-plugins`` with a PodGroup policy that starts all nodes together or none.

Per-run pod settings travel as a ``runtimePatches`` entry, the Trainer v2.3 way to patch the
runtime's pod template from a job; pods are labelled like a PyTorchJob's, so dashboards,
alerts and ``kubectl -l ladder-siam/run-id=...`` work the same with either backend.
"""

from __future__ import annotations

from typing import Any

from ladder_siam.errors import UsageError
from ladder_siam.kube.launch_config import LaunchConfig
from ladder_siam.kube.pod import credential_env, placement, resources, tracking_env

GROUP = "trainer.kubeflow.org"
API_VERSION = f"{GROUP}/v1alpha1"
KIND = "TrainJob"
RUNTIME_KIND = "TrainingRuntime"
RUNTIME_PREFIX = "ladder-siam"
# The Trainer's torch runtimes run the trainer in this replicated job and container.
NODE = "node"
# The runtimes declare this container port, named "metrics" for the PodMonitor.
RUNTIME_METRICS_PORT = 9400
PATCH_MANAGER = "ladder-siam.io/launcher"


def runtime_name(scheduler: str) -> str:
    """The TrainingRuntime in ``k8s/trainer`` for ``scheduler`` (see ``SCHEDULERS``)."""
    return RUNTIME_PREFIX if scheduler == "default" else f"{RUNTIME_PREFIX}-{scheduler}"


def build_trainjob(config: LaunchConfig) -> dict[str, Any]:
    """The TrainJob manifest for ``config``.

    Args:
        config: The launch settings; validated first.

    Returns:
        The manifest as a JSON-compatible dict, ready for ``CustomObjectsApi``.

    Raises:
        ValueError: A setting is invalid, or one a TrainJob cannot carry (the message names it).
    """
    config.validate()
    port = config.metrics_port
    if port not in (None, RUNTIME_METRICS_PORT):
        raise UsageError(
            f"LaunchConfig: metrics_port {port}: the TrainingRuntime declares port "
            f"{RUNTIME_METRICS_PORT}; use it (or 0 for no metrics) with the trainjob backend"
        )
    trainer: dict[str, Any] = {
        "image": config.image,
        "command": config.command(),
        "numNodes": config.nodes,
        "numProcPerNode": config.gpus_per_node,
        "resourcesPerNode": resources(config),
    }
    credentials = credential_env(config.s3_secret) if config.s3_secret is not None else []
    env = credentials + tracking_env(config)
    if env:
        trainer["env"] = env
    pod = {"metadata": {"labels": config.labels()}, "spec": placement(config)}
    patch = {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [{"name": NODE, "template": {"spec": {"template": pod}}}]
                }
            }
        },
    }
    spec: dict[str, Any] = {
        "runtimeRef": {
            "apiGroup": GROUP,
            "kind": RUNTIME_KIND,
            "name": runtime_name(config.scheduler),
        },
        "trainer": trainer,
        "runtimePatches": [patch],
    }
    if config.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = config.active_deadline_seconds
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": config.name,
            "namespace": config.namespace,
            "labels": config.job_labels(),
        },
        "spec": spec,
    }
