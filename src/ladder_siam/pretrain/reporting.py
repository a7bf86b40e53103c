"""What each logging interval of pretraining reports, and where it goes.

Each step's losses and collapse signals are named by :func:`interval_metrics`; every
``log_every`` steps the loop averages them over the interval and the online monitor
(``pretrain/monitor.py``) hands over its reading. :func:`interval_record` makes them one
``train_log.jsonl`` record; :class:`IntervalReporter` sets the Prometheus
gauges on every rank, checks for collapse, and on rank 0 appends the record, logs a line and,
inside a Kubeflow TrainJob that asks for it, reports progress into its status, and with
``MLFLOW_TRACKING_URI`` set logs the record to MLflow.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from ladder_siam.pretrain.model import LadderOutput
from ladder_siam.pretrain.monitor import MonitorReading
from ladder_siam.runtime.health import CollapseMonitor
from ladder_siam.runtime.metrics import TrainingMetrics
from ladder_siam.runtime.progress import Progress
from ladder_siam.runtime.tracking import TrackedRun
from ladder_siam.runtime.train_log import TrainLog
from ladder_siam.runtime.trainer_status import TrainerStatus, status_metrics

logger = logging.getLogger(__name__)


def interval_metrics(output: LadderOutput) -> dict[str, torch.Tensor]:
    """A step's values to average over the interval, by their ``train_log.jsonl`` names.

    ``loss`` is the weighted total, ``loss_<level>`` each level's loss and ``std_<level>``
    its collapse signal; they stay on the device until the interval is read.
    """
    return {
        "loss": output.loss,
        **{f"loss_{level}": loss for level, loss in output.per_level.items()},
        **{f"std_{level}": std for level, std in output.output_std.items()},
    }


def interval_record(
    step: int,
    epoch: int,
    lr: float,
    tau: float,
    means: dict[str, float],
    rate: float,
    wait: float,
    reading: MonitorReading | None = None,
) -> dict[str, Any]:
    """One ``train_log.jsonl`` record.

    Args:
        step: Steps completed.
        epoch: The current epoch.
        lr: Learning rate of the interval's last step.
        tau: EMA rate of the interval's last step.
        means: The interval's mean of each of :func:`interval_metrics`' values, by name.
        rate: Images per second over the interval.
        wait: Fraction of the interval spent waiting for data.
        reading: The online monitor's reading, if the monitor runs.
    """
    record: dict[str, Any] = {"step": step, "epoch": epoch, "lr": lr, "tau": tau, **means}
    record.update(reading.record() if reading is not None else {})
    record.update(
        {"images_per_second": rate, "data_wait_fraction": min(wait, 1.0), "time": time.time()}
    )
    return record


@dataclass
class IntervalReporter:
    """Sends each interval's record to the metrics, the collapse check, the log and the file.

    Attributes:
        metrics: This process's Prometheus metrics.
        train_log: ``train_log.jsonl`` (written by rank 0).
        collapse: The collapse check on the output std.
        total_steps: Steps of the whole run, for the log line.
        is_main: Whether this is rank 0, the one that writes and logs.
        status: The TrainJob's status reporter (rank 0, when the Trainer gives one).
        tracker: The MLflow run (rank 0, when ``MLFLOW_TRACKING_URI`` is set).
    """

    metrics: TrainingMetrics
    train_log: TrainLog
    collapse: CollapseMonitor
    total_steps: int
    is_main: bool
    status: TrainerStatus | None = None
    tracker: TrackedRun | None = None

    def report(
        self,
        record: dict[str, Any],
        levels: list[str],
        reading: MonitorReading | None,
        progress: Progress,
    ) -> None:
        """Records one interval everywhere it is watched."""
        losses = {"total": record["loss"], **{level: record[f"loss_{level}"] for level in levels}}
        spread = {level: record[f"std_{level}"] for level in levels}
        self.metrics.record_interval(
            losses=losses, output_std=spread, lr=record["lr"], tau=record["tau"],
            images_per_second=record["images_per_second"], epoch=record["epoch"],
        )  # fmt: skip
        if reading is not None:
            self.metrics.record_monitor(
                reading.probe_top1, reading.rankme, reading.projector_rankme
            )
        for level in self.collapse.update(spread, record["step"]):
            self.metrics.record_collapse_warning(level)
        if not self.is_main:
            return
        self.train_log.append(record)
        if self.status is not None:
            self.status.update(record["step"], self.total_steps, status_metrics(record))
        if self.tracker is not None:
            self.tracker.log_record(record)
        if progress.has_bar:
            return
        logger.info(
            "step %d/%d epoch %d loss %.4f %s lr %.3g tau %.5f %.0f img/s data-wait %.0f%%",
            record["step"], self.total_steps, record["epoch"], record["loss"],
            " ".join(f"{lv} {record[f'loss_{lv}']:.3f}" for lv in levels),
            record["lr"], record["tau"], record["images_per_second"],
            100 * record["data_wait_fraction"],
        )  # fmt: skip
        if reading is not None and (reading.probe_top1 or reading.rankme):
            logger.info(
                "step %d online probe top-1 %s%s",
                record["step"],
                " ".join(f"{s} {v:.1f}%" for s, v in reading.probe_top1.items()),
                "; RankMe " + " ".join(f"{s} {v:.1f}" for s, v in reading.rankme.items())
                if reading.rankme
                else "",
            )

    def finish(self, completed: bool) -> None:
        """Ends the TrainJob status and the MLflow run, as training ``completed`` or raised.

        The status gets a final 100 % only for a completed run; the MLflow run ends FINISHED
        or FAILED.
        """
        if self.tracker is not None:
            self.tracker.end(failed=not completed)
        if self.status is None:
            return
        if completed:
            self.status.finish(self.total_steps, {})
        else:
            self.status.close()
