"""The Kubeflow PyTorchJob (``kubeflow.org/v1``) that runs ``ladder-siam pretrain`` on a cluster.

One pod per node: a Master and ``nodes - 1`` Workers, each running ``torchrun`` over the node's
GPUs. The training operator injects the rendezvous (``PET_NNODES``, ``PET_NODE_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` …) into every pod, so the command is a fixed argument list:
no shell, nothing interpolated into a script. Object-store credentials reach the pods only as a
reference to a Secret (``envFrom.secretRef``); the manifest never holds a credential value.
"""

from __future__ import annotations

from typing import Any

from ladder_siam.kube.launch_config import LaunchConfig
from ladder_siam.kube.pod import pod_template

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
# The operator finds the training container by this name; any other name is rejected.
CONTAINER_NAME = "pytorch"


def _replica_spec(config: LaunchConfig, replicas: int) -> dict[str, Any]:
    return {
        "replicas": replicas,
        # A crashed pod restarts in place and the trainer resumes from its newest checkpoint.
        "restartPolicy": "OnFailure",
        "template": pod_template(config, CONTAINER_NAME),
    }


def build_pytorchjob(config: LaunchConfig) -> dict[str, Any]:
    """The PyTorchJob manifest for ``config``.

    Args:
        config: The launch settings; validated first.

    Returns:
        The manifest as a JSON-compatible dict, ready for ``CustomObjectsApi``.

    Raises:
        ValueError: A setting is invalid (the message names it).
    """
    config.validate()
    replica_specs = {"Master": _replica_spec(config, 1)}
    if config.nodes > 1:
        replica_specs["Worker"] = _replica_spec(config, config.nodes - 1)
    run_policy: dict[str, Any] = {
        # None keeps finished and failed pods so that `kubectl logs` still works; the TTL
        # removes the job (and its pods) later.
        "cleanPodPolicy": "None",
        "backoffLimit": config.backoff_limit,
        "ttlSecondsAfterFinished": config.ttl_seconds_after_finished,
    }
    if config.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = config.active_deadline_seconds
    if config.scheduler != "default":
        # One gang of every pod: the operator's PodGroup is scheduled whole or not at all.
        gang: dict[str, Any] = {"minAvailable": config.nodes}
        if config.queue_name is not None:
            gang["queue"] = config.queue_name
        if config.priority_class is not None:
            gang["priorityClass"] = config.priority_class
        run_policy["schedulingPolicy"] = gang
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": config.name,
            "namespace": config.namespace,
            "labels": config.job_labels(),
        },
        "spec": {
            # Explicit, so the operator does not fall back to "auto" (one process per CPU).
            "nprocPerNode": str(config.gpus_per_node),
            "pytorchReplicaSpecs": replica_specs,
            "runPolicy": run_policy,
        },
    }
