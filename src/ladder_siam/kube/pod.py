"""The training pod, hardened the same way whichever job kind runs it.

The pods run as non-root with a read-only root filesystem (``/tmp`` and ``/dev/shm`` are
``emptyDir`` volumes), no privilege escalation, no capabilities, seccomp ``RuntimeDefault``, no
service-account token (the trainer never calls the Kubernetes API; a cloud identity's web token
is projected separately by its webhook), and without an Istio sidecar, which breaks torchrun's
rendezvous and NCCL between pods and keeps finished pods from completing.

A PyTorchJob carries this whole pod spec. A TrainJob takes it from the TrainingRuntime that
``k8s/trainer`` ships, which a test holds equal to what is built here.
"""

from __future__ import annotations

from typing import Any

from ladder_siam.io.s3 import CREDENTIAL_VARIABLES
from ladder_siam.kube.launch_config import ISTIO_INJECT, SCHEDULERS, LaunchConfig

POD_ANNOTATIONS = {ISTIO_INJECT: "false"}


def container_security(run_as_user: int) -> dict[str, Any]:
    """The training container's securityContext."""
    return {
        "runAsNonRoot": True,
        "runAsUser": run_as_user,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security(run_as_user: int) -> dict[str, Any]:
    """The training pod's securityContext."""
    return {
        "runAsNonRoot": True,
        "runAsUser": run_as_user,
        "runAsGroup": run_as_user,
        "fsGroup": run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def volumes(shm_size: str, tmp_size: str) -> list[dict[str, Any]]:
    """The pod's ``/dev/shm`` in memory and a writable ``/tmp`` under the read-only root.

    The default 64 MiB ``/dev/shm`` is too small for the loader workers' batches.
    """
    return [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
        {"name": "tmp", "emptyDir": {"sizeLimit": tmp_size}},
    ]


VOLUME_MOUNTS = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]


def resources(config: LaunchConfig) -> dict[str, dict[str, str]]:
    """Requests and limits of one pod (one node's GPUs)."""
    gpus = str(config.gpus_per_node)
    requests = {"cpu": config.cpu_request, "memory": config.memory_request, "nvidia.com/gpu": gpus}
    limits = {"nvidia.com/gpu": gpus}
    if config.cpu_limit is not None:
        limits["cpu"] = config.cpu_limit
    if config.memory_limit is not None:
        limits["memory"] = config.memory_limit
    return {"requests": requests, "limits": limits}


def credential_env(secret: str) -> list[dict[str, Any]]:
    """The S3 variables from ``secret``, for job kinds whose container takes no ``envFrom``.

    Each is optional: a Secret for AWS S3 has no ``AWS_ENDPOINT_URL``.
    """
    return [
        {
            "name": name,
            "valueFrom": {"secretKeyRef": {"name": secret, "key": name, "optional": True}},
        }
        for name in CREDENTIAL_VARIABLES
    ]


def tracking_env(config: LaunchConfig) -> list[dict[str, Any]]:
    """The MLflow variables of ``config.tracking_env`` as container ``env`` entries.

    Plain values: the launcher forwards only non-secret variables (see ``LaunchConfig``).
    """
    return [{"name": name, "value": value} for name, value in sorted(config.tracking_env.items())]


def placement(config: LaunchConfig) -> dict[str, Any]:
    """The pod-spec fields that place a run's pods on nodes and give them an identity."""
    spec: dict[str, Any] = {}
    if config.node_selector:
        spec["nodeSelector"] = dict(config.node_selector)
    if config.tolerations:
        spec["tolerations"] = [dict(toleration) for toleration in config.tolerations]
    if config.service_account is not None:
        spec["serviceAccountName"] = config.service_account
    return spec


def pod_template(config: LaunchConfig, container_name: str) -> dict[str, Any]:
    """The whole hardened pod template of a run (labels, annotations and spec)."""
    container: dict[str, Any] = {
        "name": container_name,
        "image": config.image,
        "imagePullPolicy": "IfNotPresent",
        "command": config.command(),
        "resources": resources(config),
        "volumeMounts": [dict(mount) for mount in VOLUME_MOUNTS],
        "securityContext": container_security(config.run_as_user),
    }
    if config.metrics_port is not None:
        container["ports"] = [
            {"name": "metrics", "containerPort": config.metrics_port, "protocol": "TCP"}
        ]
    if config.s3_secret is not None:
        container["envFrom"] = [{"secretRef": {"name": config.s3_secret}}]
    if config.tracking_env:
        container["env"] = tracking_env(config)
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes(config.shm_size, config.tmp_size),
        "automountServiceAccountToken": False,
        "securityContext": pod_security(config.run_as_user),
        **placement(config),
    }
    if SCHEDULERS[config.scheduler] is not None:
        spec["schedulerName"] = SCHEDULERS[config.scheduler]
    if config.priority_class is not None:
        spec["priorityClassName"] = config.priority_class
    return {
        "metadata": {"labels": config.labels(), "annotations": dict(POD_ANNOTATIONS)},
        "spec": spec,
    }
