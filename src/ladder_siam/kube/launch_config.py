"""Where and how a training job executes on a cluster, whichever job kind carries it.

One :class:`LaunchConfig` describes a job: its image, its shape (nodes x GPUs), its place in the
cluster (namespace, queue, scheduler, identity) and what its pods run: pretraining with the
trainer's whole config, or an evaluation finetune with its flags. The builders in
:mod:`~ladder_siam.kube.pytorchjob` and :mod:`~ladder_siam.kube.trainjob` turn it into the
object a backend expects; the command each pod runs is :func:`torchrun_command` either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ladder_siam.errors import UsageError
from ladder_siam.pretrain.config import PretrainConfig
from ladder_siam.runtime.tracking import FORWARDED_VARIABLES

# The job kinds a run can be launched as: the training operator's PyTorchJob (kubeflow.org/v1)
# or Kubeflow Trainer v2's TrainJob (trainer.kubeflow.org/v1alpha1).
BACKENDS = ("pytorchjob", "trainjob")
MANAGED_BY = "ladder-siam"
RUN_ID_LABEL = "ladder-siam/run-id"
METHOD_LABEL = "ladder-siam/method"
# The arm (a method and a seed) of a run that compares several.
ARM_LABEL = "ladder-siam/arm"
# The KFP run that created the job: a retried launcher adopts only its own run's job.
OWNER_LABEL = "ladder-siam/kfp-run-id"
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

# A DNS-1035 label (starts with a letter) is also a DNS-1123 label; the operators derive
# Service names from the job name and Services need DNS-1035.
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

# What a job's pods run, ``python -m`` under torchrun; an evaluation's module and its config's.
PRETRAIN = "pretrain"
TASK_MODULES = {
    PRETRAIN: "ladder_siam.pretrain",
    "detection": "ladder_siam.evals.detection.finetune",
    "segmentation": "ladder_siam.evals.segmentation.finetune",
}
_TASK_CONFIGS = {
    "detection": "ladder_siam.evals.detection.config",
    "segmentation": "ladder_siam.evals.segmentation.config",
}
EVALUATION_TASKS = tuple(_TASK_CONFIGS)


@dataclass(frozen=True)
class LaunchConfig:
    """Where and how a training job executes: pretraining, or an evaluation of an arm.

    Attributes:
        name: Job name (DNS-1035 label, ≤ 63 characters).
        namespace: Kubernetes namespace of the job.
        image: Container image pinned to a tag other than ``latest`` or to a ``sha256`` digest.
        run_id: Run identifier, the ``ladder-siam/run-id`` label.
        arm: The run's arm this job trains (``<method>-s<seed>``), the ``ladder-siam/arm``
            label; empty for a job launched by hand.
        pretrain: The trainer's whole config, passed to every pod as ``--config-json``; its
            method labels the pods and its metrics port is declared on the container. An
            evaluation job keeps its arm's, for the method label only.
        task: What the pods run (:data:`TASK_MODULES`): ``pretrain``, or the ``detection`` or
            ``segmentation`` finetune of an arm's backbone.
        task_args: An evaluation's flags, as its ``ladder-siam finetune-*`` command takes
            them; none for pretraining.
        backend: ``pytorchjob`` or ``trainjob`` (see :data:`BACKENDS`).
        owner: The KFP run that launches the job (the ``ladder-siam/kfp-run-id`` label); a
            retried launcher adopts a job only when it carries the same owner.
        nodes: Pods (one per node).
        gpus_per_node: GPUs and torchrun processes per pod.
        cpu_request: CPU request per pod.
        cpu_limit: CPU limit per pod; unset by default because CFS quotas throttle the
            data-loader workers without protecting anyone on a dedicated GPU node.
        memory_request: Memory request per pod.
        memory_limit: Memory limit per pod.
        shm_size: Size of the in-memory ``/dev/shm`` (loader workers pass batches through it).
        tmp_size: Size of the ``/tmp`` volume: the root filesystem is read-only, and HOME,
            torch.compile's caches and the S3 upload spool live there.
        node_selector: Node labels the pods require.
        tolerations: Kubernetes tolerations, e.g. for tainted GPU nodes.
        s3_secret: Secret whose ``AWS_*`` keys become environment variables, or None: the pods
            then use the cloud identity of ``service_account`` (IRSA, Workload Identity).
        service_account: ServiceAccount of the training pods, or None (the namespace default).
        queue_name: Kueue LocalQueue to submit to (the ``kueue.x-k8s.io/queue-name`` label).
        scheduler: ``default``, or a gang scheduler (``volcano``, ``scheduler-plugins``) that
            starts all ``nodes`` pods together or none: a job never holds half its GPUs.
        priority_class: PriorityClass of the pods (and of the gang), or None.
        run_as_user: UID of the training process (the pods run as non-root).
        max_restarts: Times torchrun restarts a pod's workers after one of them dies, before
            the pod itself fails; each restart resumes from the newest checkpoint.
        backoff_limit: Pod restarts before the job fails (runs resume from checkpoints).
        active_deadline_seconds: Wall-clock limit of the job, or None.
        ttl_seconds_after_finished: Seconds a finished job (and its pods' logs) is kept.
        pending_timeout_minutes: Minutes the launcher lets the job wait without all its pods
            running (unschedulable, image not pulled, over quota) before it deletes the job and
            fails with the reason; 0 waits forever.
        tracking_env: The MLflow variables the training container gets, the launcher's own
            (``runtime.tracking.forwarded_env``): only the non-secret ones named in
            ``FORWARDED_VARIABLES``, since a manifest is no place for a credential; a tracking
            token or password must reach the pods from a Secret.
    """

    name: str
    namespace: str
    image: str
    run_id: str
    arm: str = ""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    task: str = PRETRAIN
    task_args: tuple[str, ...] = ()
    backend: str = "pytorchjob"
    owner: str = ""
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
    service_account: str | None = None
    queue_name: str | None = None
    scheduler: str = "default"
    priority_class: str | None = None
    run_as_user: int = 1000
    max_restarts: int = 3
    backoff_limit: int = 3
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int = 7 * 24 * 3600
    pending_timeout_minutes: float = 60.0
    tracking_env: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        """Raises ValueError naming the first invalid setting."""
        _check(self.backend in BACKENDS, f"backend {self.backend!r}: one of {', '.join(BACKENDS)}")
        _check(self.task in TASK_MODULES, f"task {self.task!r}: one of {', '.join(TASK_MODULES)}")
        _check(
            (self.task == PRETRAIN) == (not self.task_args),
            f"task_args {list(self.task_args)}: an evaluation's flags, and none for pretraining",
        )
        _check(
            _NAME.fullmatch(self.name) and len(self.name) <= 63,
            f"name {self.name!r}: a DNS-1035 label (a-z, 0-9, '-', ≤ 63 characters)",
        )
        _check(
            _NAMESPACE.fullmatch(self.namespace) and len(self.namespace) <= 63,
            f"namespace {self.namespace!r}: a DNS-1123 label",
        )
        _check_image(self.image)
        _check(
            self.run_id and _label_value(self.run_id),
            f"run_id {self.run_id!r}: a label value (alphanumerics, '-', '_', '.', ≤ 63)",
        )
        _check(_label_value(self.owner), f"owner {self.owner!r}: not a label value")
        _check(_label_value(self.arm), f"arm {self.arm!r}: not a label value")
        method = self.pretrain.method
        _check(_label_value(method_label(method)), f"method {method!r}: not a level string")
        for key, value in self.node_selector.items():
            _check(_label_value(value), f"node_selector {key}={value!r}: not a label value")
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
        for label, name in (
            ("s3_secret", self.s3_secret),
            ("service_account", self.service_account),
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
        _check(
            self.backend != "trainjob" or self.priority_class is None,
            "priority_class: a TrainJob's pods take theirs from the TrainingRuntime (or from "
            "Kueue's WorkloadPriorityClass); set it there, or use the pytorchjob backend",
        )
        for label in ("max_restarts", "backoff_limit", "ttl_seconds_after_finished"):
            _check(getattr(self, label) >= 0, f"{label} {getattr(self, label)}: at least 0")
        _check(
            self.active_deadline_seconds is None or self.active_deadline_seconds > 0,
            f"active_deadline_seconds {self.active_deadline_seconds}: positive",
        )
        _check(
            self.pending_timeout_minutes >= 0,
            f"pending_timeout_minutes {self.pending_timeout_minutes}: 0 (no limit) or more",
        )
        for name in self.tracking_env:
            _check(
                name in FORWARDED_VARIABLES,
                f"tracking_env {name}: only {', '.join(FORWARDED_VARIABLES)} (no credentials)",
            )
        port = self.metrics_port
        _check(port is None or 1 <= port <= 65535, f"metrics_port {port}: 1..65535 or None")

    def validate_task(self) -> None:
        """Checks what the pods will run on this job's GPUs (its batch must divide over them).

        Raises:
            UsageError: Naming the first bad setting of the trainer's or evaluation's config.
        """
        world_size = self.nodes * self.gpus_per_node
        if self.task == PRETRAIN:
            self.pretrain.validate(world_size)
        else:
            task_config(self.task, self.task_args).validate(world_size)

    @property
    def metrics_port(self) -> int | None:
        """The port the pods serve Prometheus metrics on; only pretraining serves them."""
        return self.pretrain.metrics_port if self.task == PRETRAIN else None

    def labels(self) -> dict[str, str]:
        """The labels on the job and its pods (dashboards and ``kubectl -l`` select on them)."""
        labels = {
            "app.kubernetes.io/name": "ladder-siam",
            "app.kubernetes.io/component": self.task,
            "app.kubernetes.io/managed-by": MANAGED_BY,
            RUN_ID_LABEL: self.run_id,
        }
        # An evaluation launched by hand evaluates some backbone, not the config's method.
        if self.task == PRETRAIN or self.arm:
            labels[METHOD_LABEL] = method_label(self.pretrain.method)
        if self.arm:
            labels[ARM_LABEL] = self.arm
        if self.owner:
            labels[OWNER_LABEL] = self.owner
        return labels

    def job_labels(self) -> dict[str, str]:
        """The job object's labels: the pods' plus the Kueue queue, which Kueue reads there."""
        labels = self.labels()
        if self.queue_name is not None:
            labels[KUEUE_QUEUE_LABEL] = self.queue_name
        return labels

    def argv(self) -> list[str]:
        """The task's arguments: pretraining's config as one JSON argument, or evaluation flags."""
        if self.task != PRETRAIN:
            return list(self.task_args)
        return ["--config-json", json.dumps(dataclasses.asdict(self.pretrain), sort_keys=True)]

    def command(self) -> list[str]:
        """What every pod runs: torchrun over the node's GPUs."""
        return torchrun_command(
            self.nodes, self.gpus_per_node, self.argv(), self.max_restarts, self.task
        )


def task_config(task: str, args: Sequence[str]) -> Any:
    """An evaluation's config from its flags, exactly as its module will parse them.

    Raises:
        UsageError: An unknown task, or flags its parser rejects (the message is the parser's).
    """
    if task not in _TASK_CONFIGS:
        raise UsageError(f"task {task!r}: one of {', '.join(EVALUATION_TASKS)}")
    module = importlib.import_module(_TASK_CONFIGS[task])
    parser = argparse.ArgumentParser(prog=task, add_help=False, exit_on_error=False)
    module.add_arguments(parser)
    try:
        parsed, unknown = parser.parse_known_args(list(args))
    except argparse.ArgumentError as error:
        raise UsageError(f"{task} flags: {error}") from None
    if unknown:
        raise UsageError(f"{task} flags: unknown {' '.join(unknown)}")
    return module.config_from_args(parsed)


def method_label(method: str) -> str:
    """The ``ladder-siam/method`` label: the method, or ``levels-_GGG`` for ``-GGG``.

    A label value starts and ends with a letter or digit, which a level string may not.
    """
    return method if _label_value(method) else f"levels-{method.replace('-', '_')}"


def _label_value(value: str) -> bool:
    return bool(_LABEL_VALUE.fullmatch(value)) and len(value) <= 63


def _check(condition: object, message: str) -> None:
    if not condition:
        raise UsageError(f"LaunchConfig: {message}")


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


def torchrun_command(
    nnodes: int, nproc_per_node: int, argv: list[str], max_restarts: int = 0, task: str = PRETRAIN
) -> list[str]:
    """``torchrun`` over ``task``'s module as an argument list (never a shell string).

    With ``max_restarts`` torchrun restarts the node's workers when one dies (a lost GPU, an
    OOM kill); they resume from the newest checkpoint, so the run's result is unchanged. The
    operators set the rendezvous (``PET_NODE_RANK``, ``MASTER_ADDR`` ...) in the environment.
    """
    return [
        "torchrun", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
        "--max-restarts", str(max_restarts), "-m", TASK_MODULES[task], *argv,
    ]  # fmt: skip
