"""The Kubeflow PyTorchJob (``kubeflow.org/v1``) that runs ``ladder-siam pretrain`` on a cluster.

One pod per node: a Master and ``nodes - 1`` Workers, each running ``torchrun`` over the node's
GPUs. The training operator injects the rendezvous (``PET_NNODES``, ``PET_NODE_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` …) into every pod, so the command is a fixed argument list:
no shell, nothing interpolated into a script. Object-store credentials reach the pods only as a
reference to a Secret (``envFrom.secretRef``); the manifest never holds a credential value.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ladder_siam.pretrain.config import PretrainConfig

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
# The operator finds the training container by this name; any other name is rejected.
CONTAINER_NAME = "pytorch"
MANAGED_BY = "ladder-siam"
ISTIO_INJECT = "sidecar.istio.io/inject"
# Kueue admits a job whose label names a LocalQueue, all of its pods at once.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Gang schedulers by their name here -> the pods' schedulerName. "default" is the cluster's
# own scheduler, which places pods one by one.
SCHEDULERS = {
    "default": None,
    "volcano": "volcano",
    "scheduler-plugins": "scheduler-plugins-scheduler",
}

# A DNS-1035 label (starts with a letter) is also a DNS-1123 label; the operator derives
# Service names from the job name and Services need DNS-1035.
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class LaunchConfig:
    """Where and how a pretraining run executes.

    Attributes:
        name: PyTorchJob name (DNS-1035 label, ≤ 63 characters).
        namespace: Kubernetes namespace of the job.
        image: container image pinned to a tag other than ``latest`` or to a ``sha256`` digest.
        run_id: run identifier, the ``ladder-siam/run-id`` label.
        pretrain: the trainer's whole config, passed to every pod as ``--config-json``; its
            method labels the pods and its metrics port is declared on the container.
        nodes: pods (one per node): a Master plus ``nodes - 1`` Workers.
        gpus_per_node: GPUs and torchrun processes per pod.
        cpu_request: CPU request per pod.
        cpu_limit: CPU limit per pod; unset by default because CFS quotas throttle the
            data-loader workers without protecting anyone on a dedicated GPU node.
        memory_request: memory request per pod.
        memory_limit: memory limit per pod.
        shm_size: size of the in-memory ``/dev/shm`` (loader workers pass batches through it).
        tmp_size: size of the ``/tmp`` volume: the root filesystem is read-only, and HOME,
            torch.compile's caches and the S3 upload spool live there.
        node_selector: node labels the pods require.
        tolerations: Kubernetes tolerations, e.g. for tainted GPU nodes.
        s3_secret: Secret whose keys become environment variables (``AWS_*``), or None.
        queue_name: Kueue LocalQueue to submit to (the ``kueue.x-k8s.io/queue-name`` label),
            or None.
        scheduler: ``default``, or a gang scheduler (``volcano``, ``scheduler-plugins``) that
            starts all ``nodes`` pods together or none: a job never holds half its GPUs.
        priority_class: PriorityClass of the pods (and of the gang), or None.
        run_as_user: UID of the training process (the pods run as non-root).
        backoff_limit: pod restarts before the job fails (runs resume from checkpoints).
        active_deadline_seconds: wall-clock limit of the job, or None.
        ttl_seconds_after_finished: seconds a finished job (and its pods' logs) is kept.
    """

    name: str
    namespace: str
    image: str
    run_id: str
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    nodes: int = 1
    gpus_per_node: int = 8
    cpu_request: str = "16"
    cpu_limit: str | None = None
    memory_request: str = "128Gi"
    memory_limit: str | None = "128Gi"
    shm_size: str = "32Gi"
    tmp_size: str = "100Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    s3_secret: str | None = None
    queue_name: str | None = None
    scheduler: str = "default"
    priority_class: str | None = None
    run_as_user: int = 1000
    backoff_limit: int = 3
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int = 7 * 24 * 3600

    def validate(self) -> None:
        """Raises ValueError naming the first invalid setting."""
        _check(
            _NAME.fullmatch(self.name) and len(self.name) <= 63,
            f"name {self.name!r}: a DNS-1035 label (a-z, 0-9, '-', ≤ 63 characters)",
        )
        _check(
            _NAMESPACE.fullmatch(self.namespace) and len(self.namespace) <= 63,
            f"namespace {self.namespace!r}: a DNS-1123 label",
        )
        _check_image(self.image)
        for label, value in (("run_id", self.run_id), ("method", self.pretrain.method)):
            _check(
                value and _LABEL_VALUE.fullmatch(value) and len(value) <= 63,
                f"{label} {value!r}: a label value (alphanumerics, '-', '_', '.', ≤ 63)",
            )
        for key, value in self.node_selector.items():
            _check(
                _LABEL_VALUE.fullmatch(value) and len(value) <= 63,
                f"node_selector {key}={value!r}: not a label value",
            )
        _check(self.nodes >= 1, f"nodes {self.nodes}: at least 1")
        _check(self.gpus_per_node >= 1, f"gpus_per_node {self.gpus_per_node}: at least 1")
        for label, quantity in (
            ("cpu_request", self.cpu_request), ("cpu_limit", self.cpu_limit),
            ("memory_request", self.memory_request), ("memory_limit", self.memory_limit),
            ("shm_size", self.shm_size), ("tmp_size", self.tmp_size),
        ):  # fmt: skip
            _check(
                quantity is None or _QUANTITY.fullmatch(quantity),
                f"{label} {quantity!r}: not a Kubernetes quantity such as '8', '500m', '64Gi'",
            )
        _check(
            self.s3_secret is None or _NAMESPACE.fullmatch(self.s3_secret),
            f"s3_secret {self.s3_secret!r}: a Secret name (DNS-1123)",
        )
        for label, name in (
            ("queue_name", self.queue_name),
            ("priority_class", self.priority_class),
        ):
            _check(
                name is None or (_NAMESPACE.fullmatch(name) and len(name) <= 63),
                f"{label} {name!r}: a Kubernetes object name (DNS-1123)",
            )
        _check(
            self.scheduler in SCHEDULERS,
            f"scheduler {self.scheduler!r}: one of {', '.join(SCHEDULERS)}",
        )
        _check(self.backoff_limit >= 0, f"backoff_limit {self.backoff_limit}: at least 0")
        _check(
            self.active_deadline_seconds is None or self.active_deadline_seconds > 0,
            f"active_deadline_seconds {self.active_deadline_seconds}: positive",
        )
        _check(
            self.ttl_seconds_after_finished >= 0,
            f"ttl_seconds_after_finished {self.ttl_seconds_after_finished}: at least 0",
        )
        port = self.pretrain.metrics_port
        _check(port is None or 1 <= port <= 65535, f"metrics_port {port}: 1..65535 or None")

    def labels(self) -> dict[str, str]:
        """The labels on the job and its pods (dashboards and ``kubectl -l`` select on them)."""
        return {
            "app.kubernetes.io/name": "ladder-siam",
            "app.kubernetes.io/component": "pretrain",
            "app.kubernetes.io/managed-by": MANAGED_BY,
            "ladder-siam/run-id": self.run_id,
            "ladder-siam/method": self.pretrain.method,
        }

    def pretrain_argv(self) -> list[str]:
        """The ``ladder_siam.pretrain`` arguments: the whole config as one JSON argument."""
        return ["--config-json", json.dumps(dataclasses.asdict(self.pretrain), sort_keys=True)]


def _check(condition: object, message: str) -> None:
    if not condition:
        raise ValueError(f"LaunchConfig: {message}")


def _check_image(image: str) -> None:
    """A run must be reproducible: the image is pinned to a digest or a tag other than latest."""
    if "@" in image:
        _check(
            _DIGEST.fullmatch(image.split("@", 1)[1]),
            f"image {image!r}: the digest must be sha256:<64 hex digits>",
        )
        return
    last = image.rsplit("/", 1)[-1]  # a registry's ':port' sits before the last '/'
    tag = last.split(":", 1)[1] if ":" in last else ""
    _check(
        tag and tag != "latest",
        f"image {image!r}: pin a tag other than 'latest' or a sha256 digest",
    )


def torchrun_command(nnodes: int, nproc_per_node: int, argv: list[str]) -> list[str]:
    """``torchrun`` over ``ladder_siam.pretrain`` as an argument list (never a shell string)."""
    return [
        "torchrun", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
        "-m", "ladder_siam.pretrain", *argv,
    ]  # fmt: skip


def _container(config: LaunchConfig) -> dict[str, Any]:
    gpus = str(config.gpus_per_node)
    requests = {"cpu": config.cpu_request, "memory": config.memory_request, "nvidia.com/gpu": gpus}
    limits = {"nvidia.com/gpu": gpus}
    if config.cpu_limit is not None:
        limits["cpu"] = config.cpu_limit
    if config.memory_limit is not None:
        limits["memory"] = config.memory_limit
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": config.image,
        "imagePullPolicy": "IfNotPresent",
        "command": torchrun_command(config.nodes, config.gpus_per_node, config.pretrain_argv()),
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.run_as_user,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if config.pretrain.metrics_port is not None:
        container["ports"] = [
            {"name": "metrics", "containerPort": config.pretrain.metrics_port, "protocol": "TCP"}
        ]
    if config.s3_secret is not None:
        container["envFrom"] = [{"secretRef": {"name": config.s3_secret}}]
    return container


def _replica_spec(config: LaunchConfig, replicas: int) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "containers": [_container(config)],
        "volumes": [
            # The default 64 MiB /dev/shm is too small for loader workers' shared-memory batches.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}},
            {"name": "tmp", "emptyDir": {"sizeLimit": config.tmp_size}},
        ],
        # The trainer never calls the Kubernetes API: no token in its pods.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.run_as_user,
            "runAsGroup": config.run_as_user,
            "fsGroup": config.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if config.node_selector:
        pod_spec["nodeSelector"] = dict(config.node_selector)
    if config.tolerations:
        pod_spec["tolerations"] = [dict(toleration) for toleration in config.tolerations]
    if SCHEDULERS[config.scheduler] is not None:
        pod_spec["schedulerName"] = SCHEDULERS[config.scheduler]
    if config.priority_class is not None:
        pod_spec["priorityClassName"] = config.priority_class
    return {
        "replicas": replicas,
        # A crashed pod restarts in place and the trainer resumes from its newest checkpoint.
        "restartPolicy": "OnFailure",
        "template": {
            # Istio sidecars (injected in Kubeflow's profile namespaces) break torchrun's
            # rendezvous and NCCL between pods, and keep finished pods from completing.
            "metadata": {"labels": config.labels(), "annotations": {ISTIO_INJECT: "false"}},
            "spec": pod_spec,
        },
    }


def build_pytorchjob(config: LaunchConfig) -> dict[str, Any]:
    """The PyTorchJob manifest for ``config``.

    Args:
        config: the launch settings; validated first.

    Returns:
        The manifest as a JSON-compatible dict, ready for ``CustomObjectsApi``.

    Raises:
        ValueError: a setting is invalid (the message names it).
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
    labels = config.labels()
    if config.queue_name is not None:
        labels[KUEUE_QUEUE_LABEL] = config.queue_name
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": config.name, "namespace": config.namespace, "labels": labels},
        "spec": {
            # Explicit, so the operator does not fall back to "auto" (one process per CPU).
            "nprocPerNode": str(config.gpus_per_node),
            "pytorchReplicaSpecs": replica_specs,
            "runPolicy": run_policy,
        },
    }
