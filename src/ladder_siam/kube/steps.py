"""What each Kubeflow pipeline step does, as library functions the components call.

A component (``components/``) maps its KFP inputs and outputs to one function here. The data
itself lives under the run's output URI in object storage (layout in
:mod:`ladder_siam.runtime.run_folder`); the KFP
artifacts are small pointers to it: a ``Dataset`` holds the dataset's ``manifest.json`` and
its URI in ``metadata["uri"]``, a ``Model`` holds ``backbone.json`` and the ``backbone.pt``
URI. So a run's outputs are in one place users can pull from, whatever KFP's own artifact
store is, and passing a dataset between steps copies a few kilobytes, not the shards.

Each function also logs the step's key numbers into a ``Metrics`` artifact, so the KFP UI's
run comparison shows them side by side.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Protocol

from ladder_siam.io import storage
from ladder_siam.kube.arms import plan_arms as plan_arms_of
from ladder_siam.kube.inputs import PipelineInputs, RunPlan, plan_run, prepare_parts, run_name
from ladder_siam.kube.launch_config import LaunchConfig
from ladder_siam.runtime.metrics import delete_run_groups, push_job_metrics
from ladder_siam.runtime.run_folder import RunFolder
from ladder_siam.runtime.tracking import forwarded_env
from ladder_siam.runtime.typed_config import config_from_dict

logger = logging.getLogger(__name__)


class Artifact(Protocol):
    """The part of a KFP artifact (``dsl.Dataset``, ``dsl.Model``, ...) a step uses."""

    path: str
    metadata: dict[str, Any]


class MetricsArtifact(Artifact, Protocol):
    """A KFP ``dsl.Metrics`` artifact."""

    def log_metric(self, metric: str, value: float) -> None:
        """Records one number for the UI."""


class ClassificationArtifact(Artifact, Protocol):
    """A KFP ``dsl.ClassificationMetrics`` artifact."""

    def log_confusion_matrix(self, categories: list[str], matrix: list[list[int]]) -> None:
        """Records a confusion matrix (rows: true class) for the UI to draw."""


def check_inputs(inputs: PipelineInputs, job_name: str) -> RunPlan:
    """The first step: validates the parameters and fingerprints the sources.

    See :func:`ladder_siam.kube.inputs.plan_run`.
    """
    plan = plan_run(inputs, job_name)
    for name, dataset in plan.datasets.items():
        logger.info(
            "%s: %s, %d files, %.1f MB, fingerprint %s -> %s",
            name, dataset.source, dataset.files, dataset.bytes / 1e6, dataset.fingerprint,
            dataset.dest,
        )  # fmt: skip
    logger.info("run %s -> %s", plan.run_name, plan.run_uri)
    return plan


def prepare_dataset(
    source: str,
    layout: str,
    dest: str,
    fingerprint: str,
    shard_size: int,
    max_side: int,
    workers: int,
    dataset: Artifact,
    metrics: MetricsArtifact,
) -> None:
    """Shards one source dataset into ``dest`` and points ``dataset`` at it.

    Args:
        source: The source dataset's folder URI.
        layout: Its layout (imagefolder, coco, voc, flat).
        dest: The shards' folder URI.
        fingerprint: The source listing's fingerprint, which ``dest`` is named after: KFP's
            cache reuses this step exactly while the source is unchanged, and the source must
            still match it while its shards are written.
        shard_size: Inputs per shard.
        max_side: Down-scale larger images to this longer side; 0 keeps sizes.
        workers: Decoding processes.
        dataset: Output: receives ``manifest.json`` and ``metadata["uri"]``.
        metrics: Output: samples and shards per split.
    """
    from ladder_siam.prep.prepare_shards import prepare_shards

    manifest = prepare_shards(
        source, dest, layout, shard_size, max_side or None, workers, fingerprint=fingerprint
    )
    storage.write_text(dataset.path, manifest.to_json())
    dataset.metadata.update(
        uri=dest, source=source, layout=layout, fingerprint=fingerprint,
        classes=len(manifest.classes), splits=sorted(manifest.splits),
    )  # fmt: skip
    for split, summary in manifest.splits.items():
        metrics.log_metric(f"{split}_samples", summary.num_samples)
        metrics.log_metric(f"{split}_shards", summary.num_shards)
        metrics.log_metric(f"{split}_skipped", summary.num_skipped)


def plan_parts(count: int, dest: str, fingerprint: str) -> list[dict[str, str]]:
    """The part tasks of one source prepared by ``count`` tasks: none for one.

    Each item carries its part (``I/N``, see :func:`kube.inputs.prepare_parts`) and the
    dataset's folder and fingerprint: kfp.local (2.17) hands a loop its item in place of
    every other step's output passed into it, so a loop's tasks take only the item and the
    pipeline's own parameters.
    """
    return [
        {"part": part, "dest": dest, "fingerprint": fingerprint} for part in prepare_parts(count)
    ]


def prepare_dataset_part(
    source: str,
    layout: str,
    dest: str,
    fingerprint: str,
    shard_size: int,
    max_side: int,
    workers: int,
    part: str,
) -> None:
    """Writes one part's shards of a source prepared by several tasks; commits nothing.

    The same arguments as :func:`prepare_dataset`, which runs after every part and commits;
    ``part`` is ``I/N`` (see :func:`ladder_siam.kube.inputs.prepare_parts`).
    """
    from ladder_siam.prep.prepare_shards import parse_part, prepare_shards

    prepare_shards(
        source, dest, layout, shard_size, max_side or None, workers, fingerprint=fingerprint,
        part=parse_part(part),
    )  # fmt: skip


def plan_arms(launch: str, run_uri: str, methods: list[str], seeds: list[Any]) -> list[dict]:
    """The run's arms (every method x seed) for the pipeline's loop, as plain dicts.

    Their order goes to ``<run>/arms.json`` as well.

    ``check-inputs`` has validated every arm already; see :func:`ladder_siam.kube.arms.plan_arms`.
    """
    arms = plan_arms_of(launch_config_from_json(launch), run_uri, methods, seeds)
    names = [arm.name for arm in arms]
    # Whoever reads the run folder later (a report, report_compare_runs) finds the baseline.
    storage.write_text(RunFolder(run_uri).arms_order, json.dumps(names) + "\n")
    logger.info("%d arms: %s", len(arms), ", ".join(names))
    return [dataclasses.asdict(arm) for arm in arms]


def launch_config_from_json(text: str) -> LaunchConfig:
    """Rebuilds the :class:`LaunchConfig` that ``check-inputs`` handed over as JSON.

    Every value is checked against its field's type, the nested pretraining config's too, and
    JSON's lists become tuples where a field is a tuple.
    """
    return config_from_dict(LaunchConfig, json.loads(text), "the pretrain step's launch settings")


def pretrain(
    dataset: Artifact,
    launch: str,
    backend: str,
    kfp_run_id: str,
    model: Artifact,
    metrics: MetricsArtifact,
) -> None:
    """Runs pretraining and points ``model`` at the backbone.

    Args:
        dataset: The pretraining shards (a dependency; ``launch`` already names them).
        launch: The job's settings from the first step (a ``LaunchConfig`` as JSON).
        backend: ``pytorchjob`` or ``trainjob`` (on the cluster), or ``local`` (torchrun here).
        kfp_run_id: The KFP run; labels the job, so that a retry adopts only its own run's job.
        model: Output: receives ``backbone.json`` and ``metadata["uri"]`` of ``backbone.pt``.
        metrics: Output: the last logged loss and output spread per level, and images/s.
    """
    from ladder_siam.kube import launch as launcher
    from ladder_siam.runtime.train_log import read_train_log

    # The step's MLflow run (when KFP tracks runs there) becomes the training run's parent.
    config = dataclasses.replace(
        launch_config_from_json(launch), owner=kfp_run_id, tracking_env=forwarded_env()
    )
    run = RunFolder(config.pretrain.out)
    logger.info(
        "pretraining on %s -> %s (%s backend)", dataset.metadata.get("uri"), run.uri, backend
    )
    if backend == "local":
        launcher.run_local(config)
    else:
        launcher.run(config)

    info_text = storage.read_text(run.backbone_info)
    storage.write_text(model.path, info_text)
    model.metadata.update(
        uri=run.backbone, run_uri=run.uri, run_id=config.run_id, arm=config.arm,
        **json.loads(info_text),
    )  # fmt: skip
    last = read_train_log(run.uri)[-1]
    for key, value in last.items():
        if key.startswith(("loss", "std_")) or key in ("step", "epoch", "images_per_second"):
            metrics.log_metric(key, value)


def linear_probe(
    model: Artifact,
    dataset: Artifact,
    preset: str,
    metrics: MetricsArtifact,
    classification: ClassificationArtifact,
) -> dict[str, Any]:
    """Per-stage linear probe and kNN of the run's backbone; writes ``eval/linear_probe``.

    ``classification`` gets the deepest stage's confusion matrix, when there are few enough
    classes to draw one (see :data:`ladder_siam.evals.probe.heads.CONFUSION_MAX_CLASSES`).
    """
    from ladder_siam.evals.probe.config import make_config
    from ladder_siam.evals.probe.linear_probe import linear_probe as probe

    config = make_config(preset, **_eval_paths(model, dataset, "linear_probe"))
    result = _log_scalars(probe(config), metrics)
    matrix = result["confusion"].get(list(result["stages"])[-1])
    if matrix is not None:
        classification.log_confusion_matrix(result["classes"], matrix)
    return result


def run_evaluation(
    task: str,
    model: Artifact,
    dataset: Artifact,
    preset: str,
    gpus: int,
    launch: str,
    backend: str,
    kfp_run_id: str,
    metrics: MetricsArtifact,
) -> dict[str, Any]:
    """An arm's detection or segmentation evaluation, as a training job of its own.

    Args:
        task: ``detection`` or ``segmentation``.
        model: The arm's backbone.
        dataset: The evaluation's shards.
        preset: The evaluation's preset; its global batch stays the same on any GPU count.
        gpus: GPUs of the job (see :mod:`ladder_siam.kube.evaluation_jobs`).
        launch: The arm's launch settings (its ``LaunchConfig`` as JSON), whose placement,
            queue and identity the job shares.
        backend: ``pytorchjob`` or ``trainjob``, or ``local`` (here: in this process on one
            GPU, under torchrun on more).
        kfp_run_id: The KFP run; labels the job, so that a retry adopts only its own job.
        metrics: Output: the evaluation's scalars.

    Returns:
        The evaluation's ``metrics.json``.
    """
    from ladder_siam.kube.evaluation_jobs import evaluation_args
    from ladder_siam.kube.evaluation_jobs import run_evaluation as run

    paths = _eval_paths(model, dataset, task)
    arm = dataclasses.replace(
        launch_config_from_json(launch), owner=kfp_run_id, tracking_env=forwarded_env()
    )
    args = evaluation_args(preset, paths["backbone"], paths["train"], paths["val"], paths["out"])
    return _log_scalars(run(task, args, gpus, arm, backend), metrics)


def write_report(
    models: list[Artifact],
    dataset: Artifact,
    methods: list[str],
    compare_runs: list[str],
    run_uri: str,
    metrics: MetricsArtifact,
    markdown: Artifact,
    html: Artifact,
) -> None:
    """The report comparing this run's arms (after ``compare_runs``; the first is the baseline).

    Written to ``<run>/report`` and into the KFP ``Markdown`` and ``HTML`` artifacts the UI
    shows; its numbers go into ``metrics``. The analyses (view distances, gradient maps) use
    the pretraining dataset's val split.

    Args:
        models: Every arm's backbone (collected from the pipeline's loop, in any order).
        dataset: The pretraining shards.
        methods: The run's methods, the baseline first: the report lists the arms in this
            order, then by seed.
        compare_runs: Earlier runs: arm folders, or whole runs whose arms are all added.
        run_uri: This run's folder; the report goes to its ``report/``.
        metrics: Output: the report's flat numbers.
        markdown: Output: the report as one Markdown file.
        html: Output: the self-contained page.
    """
    from ladder_siam.report.build import ReportConfig, make_report, write_kfp_outputs

    arms = sorted(
        models,
        key=lambda model: (methods.index(model.metadata["method"]), model.metadata["seed"]),
    )
    report = make_report(
        ReportConfig(
            runs=[*compare_runs, *(model.metadata["run_uri"] for model in arms)],
            out=RunFolder(run_uri).report,
            analysis_images=storage.join(dataset.metadata["uri"], "val"),
        )
    )
    write_kfp_outputs(report, metrics.path, markdown.path, html.path)
    for name, value in report.summary["scalars"].items():
        metrics.log_metric(name, value)


def record_status(
    output_uri: str, requested_run_name: str, job_name: str, state: str, error: str
) -> dict[str, Any]:
    """The exit handler: writes ``<run>/pipeline_status.json`` and pushes the outcome.

    It runs whether the pipeline succeeded or failed, so the run folder always says how the
    run ended, and ``ladder_siam_pipeline_succeeded`` alerts on a failed scheduled run. Once
    the outcome is pushed, the run's own groups (its evaluations', its report's) are deleted
    from the Pushgateway, which would otherwise grow with every run; their numbers stay in
    the run folder and, once scraped, in Prometheus.
    """
    name = run_name(requested_run_name, job_name)
    status = {
        "run_name": name, "kfp_run": job_name, "state": state, "error": error,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    storage.write_text(
        RunFolder.of(output_uri, name).pipeline_status, json.dumps(status, indent=2) + "\n"
    )
    succeeded = state == "SUCCEEDED"
    # Per namespace, not per run: each run's outcome replaces the last, so that the failure
    # alert clears when the next scheduled run succeeds. The run's groups go only once the
    # outcome is recorded; a gateway that refused it has warned once already.
    if push_job_metrics(
        "pipeline", {"pipeline_succeeded": float(succeeded)}, run=None, success=succeeded
    ):
        delete_run_groups(name)
    log = logger.info if succeeded else logger.error
    log("pipeline run %s ended %s%s", name, state, f": {error}" if error else "")
    return status


def _eval_paths(model: Artifact, dataset: Artifact, evaluation: str) -> dict[str, str]:
    """An evaluation's inputs and output folder; the rest of its config is the preset's."""
    data = dataset.metadata["uri"]
    return {
        "backbone": model.metadata["uri"],
        "train": storage.join(data, "train"),
        "val": storage.join(data, "val"),
        "out": RunFolder(model.metadata["run_uri"]).eval(evaluation),
    }


def _log_scalars(result: dict[str, Any], metrics: MetricsArtifact) -> dict[str, Any]:
    for name, value in result.get("scalars", {}).items():
        metrics.log_metric(name, value)
    return result
