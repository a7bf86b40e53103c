"""The report's answer: does a method beat the baseline, on which stage and task, for real?

Every run the report reads is an *arm* (a method and a seed). Per method, the metrics' mean ±
s.e. over its seeds; per other method, the paired difference from the baseline (the first
method) with a 95 % interval and a verdict (:mod:`ladder_siam.report.comparisons`). With one
seed, the interval is the test set's own sampling error where the evaluations recorded their
per-image results (``per_image.json``): an exact paired test for the probe's and kNN's
accuracies, a paired bootstrap over images for mIoU. Detection's mAP has none.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ladder_siam.nets.archs import STAGES
from ladder_siam.report import figures as report_figures
from ladder_siam.report.comparisons import (
    STAGE_METRICS,
    Arm,
    compare_arms,
    format_difference,
    format_mean,
    method_means,
)
from ladder_siam.report.html import Figure, Paragraph, Section, Table
from ladder_siam.report.inputs import RunResults
from ladder_siam.report.statistics import (
    CONFIDENCE,
    Interval,
    miou_difference_interval,
    paired_accuracy_interval,
)
from ladder_siam.runtime.per_image import PerImage, read_per_image
from ladder_siam.runtime.run_folder import RunFolder

# The metrics compared: Table 7's per-stage probe and kNN, then Table 2's tasks.
TASK_METRICS = {"box_ap": "box mAP", "mask_ap": "mask mAP", "miou": "mIoU"}
METRICS = (*STAGE_METRICS, *TASK_METRICS)
# How closely per-image results must reproduce a difference of the metrics (in points).
_AGREE = 0.005
# Where each metric's per-image results are: the evaluation that wrote them.
_EVALUATION = {**dict.fromkeys(STAGE_METRICS, "linear_probe"), "miou": "segmentation"}


def metric_label(metric: str) -> str:
    """``probe top-1 res3``, ``kNN top-1 res5``, ``box mAP``..."""
    if metric in TASK_METRICS:
        return TASK_METRICS[metric]
    kind, stage = metric.rsplit("_", 1)
    return f"{'probe' if kind == 'probe_top1' else 'kNN'} top-1 {stage}"


def arms_of(runs: list[RunResults]) -> list[Arm]:
    """The runs as arms; an earlier run repeating a method and seed is named by its folder."""
    arms, seen = [], set()
    for run in runs:
        method = run.method
        if (method, run.seed) in seen:
            method = f"{method} ({run.name})"
        seen.add((method, run.seed))
        metrics = {
            f"{kind}_{stage}": run.stage_metric(stage, key)
            for kind, key in (("probe_top1", "top1"), ("knn_top1", "knn_top1"))
            for stage in STAGES
        }
        metrics |= {key: run.metric(key) for key in TASK_METRICS}
        arms.append(Arm(method, run.seed, run.uri, metrics, {"name": run.name}))
    return arms


class OneSeedIntervals:
    """The test set's interval for one pair of arms, where both recorded per-image results.

    Each run's ``per_image.json`` is read once per report (a report compares every method
    with the baseline on many metrics).
    """

    def __init__(self) -> None:
        self._read: dict[tuple[str, str], PerImage | None] = {}

    def _per_image(self, run: str, evaluation: str) -> PerImage | None:
        if (run, evaluation) not in self._read:
            self._read[run, evaluation] = read_per_image(RunFolder(run).eval(evaluation))
        return self._read[run, evaluation]

    def __call__(self, metric: str, arm: Arm, baseline: Arm) -> Interval | None:
        """The interval of ``arm``'s difference from ``baseline`` on ``metric``, or None."""
        evaluation = _EVALUATION.get(metric)
        if evaluation is None:
            return None
        ours = self._per_image(arm.run, evaluation)
        theirs = self._per_image(baseline.run, evaluation)
        if ours is None or theirs is None or ours.order != theirs.order:
            return None  # not scored on the same images in the same order: no pairing
        interval = None
        if metric in ours.correct and metric in theirs.correct:
            interval = paired_accuracy_interval(ours.correct[metric], theirs.correct[metric])
        elif metric in ours.counts and metric in theirs.counts:
            a, b = ours.counts[metric], theirs.counts[metric]
            interval = miou_difference_interval(
                a["intersection"], a["union"], b["intersection"], b["union"]
            )
        # Per-image results that do not reproduce the metrics (left over from an earlier
        # evaluation in the same folder) would put an interval around the wrong number.
        difference = arm.metrics[metric] - baseline.metrics[metric]  # type: ignore[operator]
        if interval is None or abs(interval.difference - difference) > _AGREE:
            return None
        return interval


def compare(runs: list[RunResults]) -> tuple[list[Arm], list[dict[str, Any]]]:
    """The arms and every comparison with the baseline (see the module docstring)."""
    arms = arms_of(runs)
    return arms, compare_arms(arms, METRICS, OneSeedIntervals())


def comparison_section(arms: list[Arm], comparisons: list[dict[str, Any]]) -> Section:
    """Section 1: means per method, then each difference with its interval and verdict."""
    means = method_means(arms, METRICS)
    baseline = next(iter(means))
    seeds = {m: sorted({a.seed for a in arms if a.method == m}) for m in means}
    headline = [f"probe_top1_{STAGES[-1]}", f"knn_top1_{STAGES[-1]}", *TASK_METRICS]
    rows = [
        [method, _seeds(seeds[method])] + [format_mean(means[method][m]) for m in headline]
        for method in means
    ]
    stage_rows = [
        [method] + [format_mean(means[method][metric]) for metric in STAGE_METRICS]
        for method in means
    ]
    difference_rows = [
        [
            metric_label(entry["metric"]),
            entry["method"],
            _seeds(entry["seeds"]),
            format_difference(entry),
            entry["interval"],
            entry["verdict"],
        ]
        for entry in comparisons
    ]
    confidence = f"{round(CONFIDENCE * 100)} %"
    blocks: list[Any] = [
        Paragraph(
            f"Each method's metrics in percent, mean ± standard error over its seeds, and each "
            f"method's difference from the baseline, {baseline}, with a {confidence} interval. "
            "Arms with the same seed share data order and initialisation, so differences are "
            "paired by seed. The verdict reads the interval: 'better' or 'worse' when it "
            f"excludes 0, else 'not distinguishable at {confidence}'."
        ),
        Table(["method", "seeds", *(metric_label(m) for m in headline)], rows, "Per method"),
        Table(["method", *(metric_label(m) for m in STAGE_METRICS)], stage_rows, "Per stage"),
    ]
    blocks[1:1] = [Paragraph(line) for line in verdict_counts(comparisons)]
    if difference_rows:
        header = ["metric", "method", "seeds", "difference [95 % CI]", "interval", "verdict"]
        blocks.append(Table(header, difference_rows, f"Differences from {baseline}"))
    if any(len(s) < 2 for s in seeds.values()):
        blocks.append(
            Paragraph(
                "With one seed, an interval shows only the test set's sampling error (which "
                "images happen to be in it); a second pretraining seed can land elsewhere by "
                "more than that. Run two or more seeds (pretrain_seeds) to measure it. mAP has "
                "no per-image interval: 'one seed: no interval'.",
                note=True,
            )
        )
    blocks.append(stage_figure(means))
    return Section("1. Is the difference real?", blocks)


def _seeds(seeds: list[int]) -> str:
    return (
        f"n = {len(seeds)} ({'seed' if len(seeds) == 1 else 'seeds'} {', '.join(map(str, seeds))})"
    )


def verdict_counts(comparisons: list[dict[str, Any]]) -> list[str]:
    """One line per method: on how many metrics it is better, worse, or neither."""
    lines = []
    for method in dict.fromkeys(entry["method"] for entry in comparisons):
        entries = [entry for entry in comparisons if entry["method"] == method]
        counts = Counter(entry["verdict"] for entry in entries)
        parts = [f"{verdict} on {count}" for verdict, count in counts.most_common()]
        lines.append(
            f"{method} against {entries[0]['baseline']}, over {len(entries)} metrics: "
            + "; ".join(parts)
            + "."
        )
    return lines


def stage_figure(means: dict[str, dict[str, Any]]) -> Figure:
    """Per-stage probe and kNN top-1 per method, with ±1 s.e. error bars over seeds."""
    panels: dict[str, dict[str, dict[str, float | None]]] = {}
    errors: dict[str, dict[str, dict[str, float | None]]] = {}
    for kind, title in (("probe_top1", "linear probe top-1"), ("knn_top1", "kNN top-1")):
        panels[title], errors[title] = {}, {}
        for method, row in means.items():
            cells = {stage: row[f"{kind}_{stage}"] for stage in STAGES}
            panels[title][method] = {s: c["mean"] if c else None for s, c in cells.items()}
            errors[title][method] = {s: c["se"] if c else None for s, c in cells.items()}
    png = report_figures.grouped_bars(panels, STAGES, "accuracy (%)", errors)
    return Figure("method_stages.png", png, "per-stage accuracy per method (±1 s.e. over seeds)")
