"""``ladder-siam pipeline``: compile the Kubeflow pipeline, run it locally, submit or schedule it.

* ``compile`` writes the pipeline's IR YAML (what the Kubeflow UI uploads).
* ``run-local`` runs the same pipeline with ``kfp.local.SubprocessRunner(use_venv=False)``:
  every step is a subprocess of this Python, pretraining uses torchrun here (``make demo``).
* ``submit`` starts a run on a Kubeflow Pipelines host; ``schedule`` uploads the pipeline as a
  new version and creates a recurring run on it (one at a time, no catch-up).

Parameters come from ``--params FILE`` (a YAML mapping) and ``--param NAME=VALUE`` (a YAML
value, so ``pretrain_epochs=2`` is a number and ``report_compare_runs=[a, b]`` a list), the
latter winning.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from ladder_siam import IMAGE, __version__
from ladder_siam.errors import UsageError
from ladder_siam.io import storage

logger = logging.getLogger(__name__)

# The committed YAML, beside the pipeline's source (pipelines/ in the repository).
COMPILED = Path(str(files("ladder_siam.pipelines") / "ladder_siam.yaml"))
EXPERIMENT = "ladder-siam"
# A parameter line of the compiled YAML's header: "#    name: type [Default: <literal>]".
_HEADER_DEFAULT = re.compile(r"(#\s+\w+: \w+ \[Default: )(.*)(\]\n?)", re.DOTALL)


def _pipeline() -> Any:
    # Imported late: only the pipeline actions need kfp.
    from ladder_siam.pipelines.ladder_siam import ladder_siam_pipeline

    return ladder_siam_pipeline


def parameter_names() -> list[str]:
    """The pipeline's parameter names, as the UI lists them."""
    return sorted(_pipeline().component_spec.inputs)


def compile_pipeline(out: str, image: str | None = None) -> None:
    """Writes the pipeline's YAML to ``out`` (atomically).

    Args:
        out: Destination file (local path or URI).
        image: The image of the steps and the training pods' default; by default the release's
            tag under ``registry.example.com``.
    """
    from kfp import compiler

    with tempfile.TemporaryDirectory() as folder:
        package = Path(folder) / "pipeline.yaml"
        compiler.Compiler().compile(_pipeline(), str(package))
        text = _stable_header(package.read_text())
    # The components' base_image is fixed when they are defined; the image name occurs in
    # the YAML only as the executors' image and the `image` parameter's default.
    storage.write_text(out, text.replace(IMAGE, image) if image else text)
    logger.info("compiled the pipeline to %s", out)


def _stable_header(text: str) -> str:
    """Sorts the dict keys in the YAML's header comment, so a compile is reproducible.

    KFP renders parameter defaults there in protobuf map order, which changes from process to
    process for a dict inside a list (``cluster_gpu_tolerations``); the committed file must not.
    """

    def canonical(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: canonical(value[key]) for key in sorted(value)}
        return [canonical(item) for item in value] if isinstance(value, list) else value

    lines = []
    for line in text.splitlines(keepends=True):
        match = _HEADER_DEFAULT.fullmatch(line)
        if match:
            line = f"{match[1]}{canonical(ast.literal_eval(match[2]))!r}{match[3]}"
        lines.append(line)
    return "".join(lines)


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UsageError(f"{where}: not valid YAML: {error}") from error


# Parameters that changed their meaning, with what a params file should say instead.
RENAMED = {
    "pretrain_method": "pretrain_methods, a list with the baseline first (e.g. "
    "pretrain_methods: [byol, ladder-byol]), trained once per seed of pretrain_seeds",
}


def load_params(params_file: str | None, assignments: list[str]) -> dict[str, Any]:
    """Merges ``--params FILE`` and ``--param NAME=VALUE`` and checks every name.

    Raises:
        UsageError: An assignment without ``=``, text that is not YAML, a file that is not a
            mapping, or a name the pipeline does not have.
    """
    params: dict[str, Any] = {}
    if params_file:
        loaded = _yaml(storage.read_text(params_file), f"--params {params_file}") or {}
        if not isinstance(loaded, dict):
            raise UsageError(f"--params {params_file}: not a YAML mapping of name: value")
        params.update(loaded)
    for assignment in assignments:
        name, equals, value = assignment.partition("=")
        if not equals:
            raise UsageError(f"--param {assignment!r}: expected NAME=VALUE")
        params[name.strip()] = _yaml(value, f"--param {assignment!r}")
    for old, new in RENAMED.items():
        if old in params:
            raise UsageError(f"{old}: replaced by {new}")
    known = parameter_names()
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise UsageError(f"unknown pipeline parameters {unknown}; known: {', '.join(known)}")
    return params


def run_local(params: dict[str, Any], pipeline_root: str) -> None:
    """Runs the pipeline here through kfp.local, every step a subprocess of this Python.

    Pretraining uses torchrun on this machine (``cluster_launch_backend=local``) unless ``params``
    says otherwise. Raises ``RuntimeError`` naming the failed step when one fails.
    """
    from kfp import local

    # kfp.local runs the arms' steps at once on this machine's cores: OpenMP threads that spin
    # while they wait would take the cores from the other arms' processes.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root)
    with warnings.catch_warnings():
        # Expected here, so not worth a warning per step: the steps run in this Python, which
        # has the image's package, and pods' resources and node selectors mean nothing here.
        warnings.filterwarnings("ignore", "You may be attemping to run a task that uses custom")
        warnings.filterwarnings("ignore", "Task .* have no effect in the current local runner")
        _pipeline()(**{"cluster_launch_backend": "local", **params})
    logger.info("pipeline finished; KFP's step outputs are under %s", pipeline_root)


def _client(host: str, namespace: str | None) -> Any:
    import kfp

    # Credentials come from kfp's usual places (in-cluster token, KF_PIPELINES_* env).
    return kfp.Client(host=host, namespace=namespace or "kubeflow")


def submit(
    host: str,
    params: dict[str, Any],
    run_name: str | None = None,
    experiment: str = EXPERIMENT,
    namespace: str | None = None,
    service_account: str | None = None,
) -> str:
    """Starts one run on a Kubeflow Pipelines host; returns its id."""
    client = _client(host, namespace)
    with tempfile.TemporaryDirectory() as folder:
        package = str(Path(folder) / "ladder_siam.yaml")
        compile_pipeline(package)
        result = client.create_run_from_pipeline_package(
            package,
            arguments=params,
            run_name=run_name,
            experiment_name=experiment,
            namespace=namespace,
            service_account=service_account,
        )
    logger.info("started run %s on %s", result.run_id, host)
    return str(result.run_id)


def check_cron(cron: str) -> str:
    """KFP's cron has six fields, seconds first (``0 0 3 * * 0``: Sundays at 03:00)."""
    fields = cron.split()
    if len(fields) != 6:
        hint = f"; did you mean '0 {cron}'?" if len(fields) == 5 else ""
        raise UsageError(
            f"--cron {cron!r}: KFP takes 6 fields (seconds minutes hours day month weekday){hint}"
        )
    return " ".join(fields)


def schedule(
    host: str,
    cron: str,
    params: dict[str, Any],
    job_name: str = "ladder-siam-weekly",
    experiment: str = EXPERIMENT,
    namespace: str | None = None,
    service_account: str | None = None,
) -> str:
    """Uploads the pipeline as a new version and creates a recurring run of it.

    The version is named after the release and the YAML's hash, so re-scheduling unchanged
    code reuses it. The recurring run starts one run at a time and skips the runs it missed
    while paused (``no_catchup``): retraining on this week's data, once.

    Returns:
        The recurring run's id.
    """
    cron = check_cron(cron)
    client = _client(host, namespace)
    with tempfile.TemporaryDirectory() as folder:
        package = str(Path(folder) / "ladder_siam.yaml")
        compile_pipeline(package)
        digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()[:12]
        version_name = f"{__version__}-{digest}"
        name = _pipeline().name
        pipeline_id = _pipeline_id(client, name, namespace)
        if pipeline_id is None:
            # In a profile namespace: shared pipelines are for admins to upload.
            pipeline_id = client.upload_pipeline(package, name, namespace=namespace).pipeline_id
        version_id = _version_id(client, pipeline_id, version_name)
        if version_id is None:
            version_id = client.upload_pipeline_version(
                package, version_name, pipeline_id=pipeline_id
            ).pipeline_version_id
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    recurring = client.create_recurring_run(
        experiment_id=experiment_id,
        job_name=job_name,
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        params=params,
        pipeline_id=pipeline_id,
        version_id=version_id,
        service_account=service_account,
    )
    logger.info("scheduled %s (%s) on %s: pipeline version %s", job_name, cron, host, version_name)
    return str(recurring.recurring_run_id)


def _named(name: str) -> str:
    """A KFP list filter: display_name equals ``name``."""
    predicate = {"operation": "EQUALS", "key": "display_name", "string_value": name}
    return json.dumps({"predicates": [predicate]})


def _pipeline_id(client: Any, name: str, namespace: str | None) -> str | None:
    pipelines = client.list_pipelines(filter=_named(name), namespace=namespace).pipelines or []
    return pipelines[0].pipeline_id if pipelines else None


def _version_id(client: Any, pipeline_id: str, version_name: str) -> str | None:
    found = client.list_pipeline_versions(pipeline_id, filter=_named(version_name))
    versions = found.pipeline_versions or []
    return versions[0].pipeline_version_id if versions else None


@contextmanager
def _server_errors(host: str) -> Iterator[None]:
    """Turns the KFP API's errors into one clear line (and exit status 2) instead of a trace."""
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as error:
        raise OSError(
            f"{host}: the KFP API answered {error.status} {error.reason}: {error.body}"
        ) from error
    except HTTPError as error:
        raise OSError(f"{host}: cannot reach the KFP API: {error}") from error


def get_args_parser() -> argparse.ArgumentParser:
    """Options of ``ladder-siam pipeline``."""
    parser = argparse.ArgumentParser(add_help=False)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    compile_parser = actions.add_parser("compile", help="write the pipeline's YAML")
    compile_parser.add_argument(
        "--out", default=str(COMPILED), help="file to write (default: %(default)s)"
    )
    compile_parser.add_argument(
        "--image", help=f"your registry's copy of the project image (default: {IMAGE})"
    )

    params = argparse.ArgumentParser(add_help=False)
    params.add_argument("--params", metavar="FILE", help="YAML mapping of parameter: value")
    params.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="one parameter (a YAML value); repeatable; wins over --params",
    )
    local = actions.add_parser("run-local", parents=[params], help="run it here with kfp.local")
    local.add_argument(
        "--pipeline-root",
        default="local_outputs",
        help="folder for KFP's step outputs (default: %(default)s)",
    )

    remote = argparse.ArgumentParser(add_help=False, parents=[params])
    remote.add_argument("--host", required=True, help="Kubeflow Pipelines API URL")
    remote.add_argument("--namespace", help="Kubeflow profile namespace (multi-user installs)")
    remote.add_argument(
        "--experiment", default=EXPERIMENT, help="experiment (default: %(default)s)"
    )
    remote.add_argument(
        "--service-account",
        help="service account of the steps, e.g. ladder-siam-launcher (k8s/base)",
    )
    submit_parser = actions.add_parser("submit", parents=[remote], help="start one run")
    submit_parser.add_argument("--run-name", help="name of the run in the UI")
    schedule_parser = actions.add_parser(
        "schedule", parents=[remote], help="create a recurring run"
    )
    schedule_parser.add_argument(
        "--cron",
        required=True,
        help="6-field cron, seconds first: '0 0 3 * * 0' is Sundays at 03:00",
    )
    schedule_parser.add_argument(
        "--job-name",
        default="ladder-siam-weekly",
        help="recurring run's name (default: %(default)s)",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    """Runs one ``ladder-siam pipeline`` action from parsed arguments."""
    if args.action == "compile":
        compile_pipeline(args.out, args.image)
        return
    params = load_params(args.params, args.param)
    if args.action == "run-local":
        run_local(params, args.pipeline_root)
    elif args.action == "submit":
        with _server_errors(args.host):
            submit(
                args.host, params, args.run_name, args.experiment, args.namespace,
                args.service_account,
            )  # fmt: skip
    else:
        with _server_errors(args.host):
            schedule(
                args.host, args.cron, params, args.job_name, args.experiment,
                args.namespace, args.service_account,
            )  # fmt: skip
