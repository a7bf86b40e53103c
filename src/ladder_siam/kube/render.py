r"""``ladder-siam launch render``: the exact job the launcher would create, as YAML on stdout.

For review before a run and for GitOps: the object is built by the same code as the
pipeline's launcher (:func:`~ladder_siam.kube.launch.build_job`), from the same settings, so
what is reviewed is what runs. ``render`` takes every pretraining flag (``--method``,
``--batch-size`` …), as ``ladder-siam pretrain`` takes it:

    ladder-siam launch render --backend trainjob --run-name r50-ladder --nodes 4 \
        --gpus-per-node 8 --image registry.example.com/ladder-siam:0.1.0 \
        --shards s3://bucket/datasets/in1k --out s3://bucket/runs/r50-ladder \
        --config ladder-byol_r50_in1k_200ep > trainjob.yaml

``render-eval`` renders an evaluation's job: the job's flags, then the evaluation, then its
own flags, as ``ladder-siam finetune-detection`` (or ``finetune-segmentation``) takes them:

    ladder-siam launch render-eval --run-name r50-ladder-det --gpus-per-node 8 \
        --image registry.example.com/ladder-siam:0.1.0 detection --preset coco-1x \
        --backbone s3://bucket/runs/r50-ladder/backbone.pt --train s3://bucket/datasets/coco \
        --val s3://bucket/datasets/coco --out s3://bucket/runs/r50-ladder/eval/detection
"""

from __future__ import annotations

import argparse
import sys

import yaml

from ladder_siam.kube.launch import build_job
from ladder_siam.kube.launch_config import (
    BACKENDS,
    EVALUATION_TASKS,
    PRETRAIN,
    SCHEDULERS,
    LaunchConfig,
)
from ladder_siam.pretrain.config import PretrainConfig, add_arguments, config_from_args


def render(config: LaunchConfig) -> str:
    """The job of ``config`` as a YAML document, ready for ``kubectl apply -f -``.

    Raises:
        ValueError: A launch, pretraining or evaluation setting is invalid (the message names
            it).
    """
    config.validate_task()
    return yaml.safe_dump(build_job(config), sort_keys=False)


def launch_config_from_args(args: argparse.Namespace) -> LaunchConfig:
    """The :class:`LaunchConfig` that the flags describe (checked by :func:`render`)."""
    evaluation = args.action == "render-eval"
    return LaunchConfig(
        name=args.run_name,
        namespace=args.namespace,
        image=args.image,
        run_id=args.run_name,
        pretrain=PretrainConfig() if evaluation else config_from_args(args),
        task=args.task if evaluation else PRETRAIN,
        task_args=tuple(args.task_args) if evaluation else (),
        backend=args.backend,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        s3_secret=args.s3_secret or None,
        service_account=args.service_account,
        queue_name=args.queue_name,
        scheduler=args.scheduler,
        priority_class=args.priority_class,
    )


def get_args_parser() -> argparse.ArgumentParser:
    """Options of ``ladder-siam launch``."""
    parser = argparse.ArgumentParser(add_help=False)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    render_parser = actions.add_parser(
        "render", help="print the pretraining job the launcher would create (YAML)"
    )
    _add_job_flags(render_parser)
    add_arguments(render_parser.add_argument_group("pretraining (as ladder-siam pretrain)"))
    evaluation = actions.add_parser(
        "render-eval",
        help="print an evaluation's job (YAML): job flags, then the evaluation and its flags",
    )
    _add_job_flags(evaluation)
    evaluation.add_argument("task", choices=EVALUATION_TASKS, help="the evaluation")
    evaluation.add_argument(
        "task_args", nargs=argparse.REMAINDER, metavar="...",
        help="its flags, as ladder-siam finetune-detection or finetune-segmentation takes them",
    )  # fmt: skip
    return parser


def _add_job_flags(parser: argparse.ArgumentParser) -> None:
    job = parser.add_argument_group("the job")
    job.add_argument(
        "--backend", choices=BACKENDS, default="pytorchjob",
        help="pytorchjob (training operator) or trainjob (Kubeflow Trainer v2, with the "
        "runtimes of k8s/trainer); default: %(default)s",
    )  # fmt: skip
    job.add_argument(
        "--run-name", required=True, help="names the job and its ladder-siam/run-id label"
    )
    job.add_argument("--nodes", type=int, default=1, help="pods, one per node (default: 1)")
    job.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs and processes per pod (default: 8)"
    )
    job.add_argument("--image", required=True, help="training image, pinned to a tag or digest")
    job.add_argument("--namespace", default="default", help="namespace (default: %(default)s)")
    job.add_argument(
        "--s3-secret", default="ladder-siam-s3",
        help="Secret with the AWS_* keys; empty: none, use the pods' cloud identity "
        "(default: %(default)s)",
    )  # fmt: skip
    job.add_argument("--service-account", help="ServiceAccount of the pods (cloud identity)")
    job.add_argument("--queue-name", help="Kueue LocalQueue (the kueue.x-k8s.io/queue-name label)")
    job.add_argument(
        "--scheduler", choices=list(SCHEDULERS), default="default",
        help="a gang scheduler starts all pods together or none (default: %(default)s)",
    )  # fmt: skip
    job.add_argument("--priority-class", help="PriorityClass of the pods")


def main(args: argparse.Namespace) -> None:
    """Writes the rendered job to stdout."""
    sys.stdout.write(render(launch_config_from_args(args)))
