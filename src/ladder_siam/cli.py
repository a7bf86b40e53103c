"""The ``ladder-siam`` command: one subcommand per pipeline step.

Each subcommand is a thin shell: its options come from the step module's
``get_args_parser()`` and its work is the module's ``main(args)``. The modules are imported
only when their subcommand runs, so ``ladder-siam prepare-shards`` never pays for importing
torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ladder_siam import __version__
from ladder_siam.errors import UsageError
from ladder_siam.io import storage

# subcommand -> (module, one-line help)
COMMANDS = {
    "demo-data": ("ladder_siam.prep.demo_data", "generate the built-in demo dataset"),
    "import-fashion-mnist": (
        "ladder_siam.prep.fashion_mnist",
        "write Debian's Fashion-MNIST as an imagefolder dataset",
    ),
    "prepare-shards": (
        "ladder_siam.prep.prepare_shards",
        "turn a source dataset into webdataset shards with manifests",
    ),
    "pretrain": (
        "ladder_siam.pretrain.train",
        "Ladder Siamese pretraining (single process or torchrun)",
    ),
    "linear-probe": (
        "ladder_siam.evals.probe.linear_probe",
        "per-stage linear probe and kNN of a backbone",
    ),
    "finetune-detection": (
        "ladder_siam.evals.detection.finetune",
        "Mask R-CNN (FPN) finetune and COCO evaluation of a backbone",
    ),
    "finetune-segmentation": (
        "ladder_siam.evals.segmentation.finetune",
        "FCN-D8 finetune and mIoU evaluation of a backbone",
    ),
    "report": ("ladder_siam.report.build", "the HTML/Markdown report comparing runs"),
    "pipeline": (
        "ladder_siam.pipelines.runs",
        "compile the Kubeflow pipeline, run it locally, submit or schedule it",
    ),
    "launch": (
        "ladder_siam.kube.render",
        "render the PyTorchJob or TrainJob of a run as YAML, for review or GitOps",
    ),
    "artifacts": ("ladder_siam.artifacts", "list or download a run's outputs"),
    "export": ("ladder_siam.export", "convert a backbone.pt for safetensors, Detectron2 or timm"),
}


def _add_common_options(parser: argparse.ArgumentParser, nested: bool = False) -> None:
    # A nested action (``pipeline submit``) takes them too, after its own name; SUPPRESS
    # keeps its unset options from hiding values given before the action.
    parser.add_argument(
        "--s3-endpoint",
        default=argparse.SUPPRESS if nested else None,
        help="S3-compatible endpoint URL (MinIO, SeaweedFS); default: $AWS_ENDPOINT_URL or AWS",
    )
    parser.add_argument(
        "--log-level",
        default=argparse.SUPPRESS if nested else "INFO",
        help="logging level (DEBUG, INFO, ...)",
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported for its options."""
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common)
    parser = argparse.ArgumentParser(
        prog="ladder-siam", description="Ladder Siamese Network pretraining, step by step."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        parents = [common]
        if name == command:
            parents.insert(0, importlib.import_module(module_name).get_args_parser())
        sub = subparsers.add_parser(name, parents=parents, help=help_text, description=help_text)
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                for nested_name, nested in action.choices.items():
                    nested.prog = f"{sub.prog} {nested_name}"
                    _add_common_options(nested, nested=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if arg in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    storage.set_s3_endpoint(args.s3_endpoint)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        module.main(args)
    except (UsageError, OSError) as error:
        # Bad input or a failed read: one clear line and a non-zero exit for KFP/Kubernetes.
        # Any other exception is a bug and keeps its traceback.
        logging.getLogger("ladder_siam").error("%s: %s", args.command, error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
