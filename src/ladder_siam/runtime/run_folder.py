"""The run folder: where every file of a pretraining run and of its evaluations lives.

One pipeline output URI holds the datasets it prepared and one folder per pipeline run. A
run trains one *arm* per method and seed; each arm's folder is a pretraining run folder of its
own (what ``ladder-siam pretrain --out`` writes)::

    OUTPUT/datasets/<source>-<fingerprint>/       shards and manifests (prepare-shards)
    OUTPUT/runs/<run>/
        arms.json                                 the arms' names, in the run's order
        arms/<method>-s<seed>/                    one arm:
            backbone.pt, backbone.json            the exported online backbone and its arch
            backbone.safetensors                  the same tensors, loadable without pickle
            train_log.jsonl                       one line per logging interval
            checkpoints/step-000123.pt            atomic; the newest that loads is resumed
            eval/<evaluation>/metrics.json        with the evaluation's own log and checkpoints
        report/                                   index.html, report.md, PNGs, summary.json
        pipeline_status.json                      written by the pipeline's exit handler

Every module names these files through this one, so the layout changes in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from ladder_siam.io import storage

DATASETS = "datasets"
RUNS = "runs"
ARMS = "arms"
# The arms' names in the run's order (methods as listed, then seeds): the first is the baseline.
ARMS_ORDER = "arms.json"
BACKBONE = "backbone.pt"
BACKBONE_INFO = "backbone.json"
BACKBONE_SAFETENSORS = "backbone.safetensors"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
EVAL = "eval"
METRICS = "metrics.json"
REPORT = "report"
PIPELINE_STATUS = "pipeline_status.json"
# The evaluations a run can have, in the order the report shows them.
EVALUATIONS = ("linear_probe", "detection", "segmentation")


def run_of(uri: str) -> str:
    """The run whose folder holds ``uri``: ``<run>`` or, inside an arm, ``<run>/<arm>``.

    A folder outside any run folder (an evaluation run by hand with ``--out``) is its own
    run: its last path component.
    """
    parts = uri.rstrip("/").split("/")
    after_runs = [i + 1 for i, part in enumerate(parts[:-1]) if part == RUNS]
    if not after_runs:
        return parts[-1]
    run = after_runs[-1]
    if len(parts) > run + 2 and parts[run + 1] == ARMS:
        return f"{parts[run]}/{parts[run + 2]}"
    return parts[run]


def metrics_uri(out: str) -> str:
    """The ``metrics.json`` an evaluation (or any step) writes into its output folder."""
    return storage.join(out, METRICS)


@dataclass(frozen=True)
class RunFolder:
    """The files of one pretraining run, under ``uri``."""

    uri: str

    @classmethod
    def of(cls, output_uri: str, run_name: str) -> RunFolder:
        """The folder of run ``run_name`` under a pipeline's output URI."""
        return cls(storage.join(output_uri, RUNS, run_name))

    def arm(self, name: str) -> RunFolder:
        """The folder of one arm (a method and a seed) of this run."""
        return RunFolder(storage.join(self.uri, ARMS, name))

    @property
    def arms_order(self) -> str:
        """``arms.json``: the arms' names in the run's order, the baseline's first."""
        return storage.join(self.uri, ARMS_ORDER)

    @property
    def backbone(self) -> str:
        """The exported backbone, a torchvision ResNet state_dict."""
        return storage.join(self.uri, BACKBONE)

    @property
    def backbone_safetensors(self) -> str:
        """``backbone.safetensors``: the backbone's tensors, for frameworks that avoid pickle."""
        return storage.join(self.uri, BACKBONE_SAFETENSORS)

    @property
    def backbone_info(self) -> str:
        """``backbone.json``: the backbone's arch, input size, method and step."""
        return storage.join(self.uri, BACKBONE_INFO)

    @property
    def train_log(self) -> str:
        """The JSON-lines training log."""
        return storage.join(self.uri, TRAIN_LOG)

    @property
    def report(self) -> str:
        """The folder of the run's report."""
        return storage.join(self.uri, REPORT)

    @property
    def pipeline_status(self) -> str:
        """The status the pipeline's exit handler records."""
        return storage.join(self.uri, PIPELINE_STATUS)

    def eval(self, evaluation: str) -> str:
        """The output folder of one evaluation (one of :data:`EVALUATIONS`)."""
        return storage.join(self.uri, EVAL, evaluation)

    def eval_metrics(self, evaluation: str) -> str:
        """The ``metrics.json`` of one evaluation."""
        return metrics_uri(self.eval(evaluation))
