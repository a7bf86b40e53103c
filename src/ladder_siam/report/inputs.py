"""Reading a pretraining run's artifacts for the report, each of them optional.

A run folder holds ``train_log.jsonl``, ``backbone.pt`` with ``backbone.json``, and one
``eval/<evaluation>/metrics.json`` per evaluation that ran (:mod:`ladder_siam.runtime.run_folder`).
Evaluations are skipped on purpose (no COCO data, a cheaper pipeline), so a missing file is
recorded as None and shown as "not run"; a file that exists but cannot be parsed is an error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ladder_siam.errors import UsageError
from ladder_siam.io import storage
from ladder_siam.runtime.run_folder import ARMS, BACKBONE_INFO, EVALUATIONS, TRAIN_LOG, RunFolder
from ladder_siam.runtime.train_log import read_train_log

logger = logging.getLogger(__name__)

# The headline metrics of Tables 1 and 2: key -> (evaluation, path into its metrics.json).
HEADLINE = {
    "probe_top1": ("linear_probe", ("stages", "res5", "top1")),
    "box_ap": ("detection", ("bbox", "AP")),
    "mask_ap": ("detection", ("segm", "AP")),
    "miou": ("segmentation", ("mIoU",)),
}
HEADLINE_LABELS = {
    "probe_top1": "probe top-1 (res5)",
    "box_ap": "box mAP",
    "mask_ap": "mask mAP",
    "miou": "VOC mIoU",
}


@dataclass
class RunResults:
    """Everything the report knows about one run; None (or empty) where a file is missing.

    Attributes:
        name: The run's label in tables and legends.
        uri: The run's output folder.
        method: Its pretraining method (``backbone.json``; else its name).
        seed: Its pretraining seed (``backbone.json``; 0 for runs from before seeds were
            recorded, the only seed the pipeline used then).
        backbone_info: ``backbone.json`` (arch, small_input, method, levels, step).
        backbone_uri: ``backbone.pt`` if it exists.
        train_log: The records of ``train_log.jsonl``.
        evaluations: Each evaluation's ``metrics.json``, or None where it did not run.
    """

    name: str
    uri: str
    method: str
    seed: int
    backbone_info: dict[str, Any] | None
    backbone_uri: str | None
    train_log: list[dict[str, Any]]
    evaluations: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def metric(self, key: str) -> float | None:
        """A headline metric (a key of :data:`HEADLINE`), or None when not run."""
        evaluation, path = HEADLINE[key]
        return _lookup(self.evaluations.get(evaluation), path)

    def stage_metric(self, stage: str, kind: str) -> float | None:
        """The linear probe's ``kind`` (``top1``, ``top5``, ``knn_top1``) on ``stage``."""
        return _lookup(self.evaluations.get("linear_probe"), ("stages", stage, kind))


def _lookup(data: dict[str, Any] | None, path: tuple[str, ...]) -> float | None:
    value: Any = data
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def _read_json(uri: str) -> dict[str, Any] | None:
    if not storage.exists(uri):
        return None
    try:
        data = json.loads(storage.read_text(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{uri}: not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise UsageError(f"{uri}: expected a JSON object, found {type(data).__name__}")
    return data


def load_run(uri: str, name: str | None = None) -> RunResults:
    """Reads one run's artifacts.

    Args:
        uri: The run's output folder.
        name: Its label; default: ``backbone.json``'s method, else the folder's name.

    Raises:
        ValueError: A file is not valid JSON, or the folder holds none of a run's artifacts
            (most likely a wrong URI).
    """
    run = RunFolder(uri)
    info = _read_json(run.backbone_info)
    backbone = run.backbone
    log_uri = run.train_log
    try:
        train_log = read_train_log(uri) if storage.exists(log_uri) else []
    except json.JSONDecodeError as error:
        raise UsageError(f"{log_uri}: not valid JSON lines: {error}") from error
    evaluations = {
        evaluation: _read_json(run.eval_metrics(evaluation)) for evaluation in EVALUATIONS
    }
    has_backbone = storage.exists(backbone)
    if info is None and not has_backbone and not train_log and not any(evaluations.values()):
        raise UsageError(
            f"{uri}: no run artifacts (backbone.pt, backbone.json, {TRAIN_LOG}, "
            "eval/*/metrics.json); is this a pretraining run's --out?"
        )
    default = (info or {}).get("method") or uri.rstrip("/").rsplit("/", 1)[-1]
    if info is not None and "seed" in info:
        default = f"{default} s{info['seed']}"
    missing = [evaluation for evaluation, data in evaluations.items() if data is None]
    if missing:
        logger.info("%s: not run: %s", uri, ", ".join(missing))
    return RunResults(
        name=name or str(default),
        uri=uri,
        method=str((info or {}).get("method") or name or default),
        seed=int((info or {}).get("seed", 0)),
        backbone_info=info,
        backbone_uri=backbone if has_backbone else None,
        train_log=train_log,
        evaluations=evaluations,
    )


def arms_of_run(uri: str) -> list[str]:
    """The arm folders of a pipeline run (``<run>/arms/*/backbone.json``).

    In the run's order (``arms.json``: its methods as listed, then seeds), so that the
    baseline stays first. Without ``arms.json`` (arms gathered by hand), the arms found under
    ``arms/``, by name.
    """
    folder = storage.join(uri, ARMS)
    order_uri = RunFolder(uri).arms_order
    if storage.exists(order_uri):
        # One read and a check per arm, not a listing of every arm's checkpoints.
        listed = [storage.join(folder, name) for name in json.loads(storage.read_text(order_uri))]
        return [arm for arm in listed if storage.exists(RunFolder(arm).backbone_info)]
    if not storage.is_s3(folder) and not storage.local_path(folder).is_dir():
        return []
    depth = storage.join(folder, "arm", BACKBONE_INFO).count("/")
    return sorted(
        info.uri.removesuffix("/" + BACKBONE_INFO)
        for info in storage.list_files(folder)
        if info.uri.endswith("/" + BACKBONE_INFO) and info.uri.count("/") == depth
    )


def expand_runs(uris: list[str], names: list[str] | None = None) -> list[str]:
    """Run folders as the report reads them: a pipeline run's folder becomes its arms.

    A folder with ``arms/*/backbone.json`` stands for each of those arms; any other folder
    is one run (an arm, or a run of ``ladder-siam pretrain``).

    Raises:
        ValueError: ``names`` given for a folder that stands for several arms.
    """
    expanded = []
    for uri in uris:
        arms = arms_of_run(uri)
        if names is not None and len(arms) > 1:
            raise UsageError(
                f"--names: {uri} is a pipeline run of {len(arms)} arms; name its arms' folders "
                f"({uri}/{ARMS}/...) one by one, or leave out --names"
            )
        expanded += arms or [uri]
    return expanded


def load_runs(uris: list[str], names: list[str] | None = None) -> list[RunResults]:
    """Reads every run; default names that collide get ``-2``, ``-3``... appended.

    Raises:
        ValueError: ``names`` does not match ``uris`` one to one or repeats a name, or a run
            cannot be read (see :func:`load_run`).
    """
    if names is not None:
        if len(names) != len(uris):
            raise UsageError(f"--names: {len(names)} names for {len(uris)} runs")
        if len(set(names)) != len(names):
            raise UsageError(f"--names {names}: every run needs its own name")
    runs = [load_run(uri, names[i] if names else None) for i, uri in enumerate(uris)]
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name}-{seen[run.name]}"
    return runs
