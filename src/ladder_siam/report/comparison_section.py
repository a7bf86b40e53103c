"""The report's answer: does a method beat the baseline, on which stage and task, for real?

Every run the report reads is an *arm* (a method and a seed). Per method, the metrics' mean ±
s.e. over its seeds; per other method, the paired difference from the baseline (the first
method) with a 95 % interval and a verdict (:mod:`ladder_siam.report.comparisons`, which
also holds the one-seed intervals). Detection's mAP has no per-image interval.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ladder_siam.nets.archs import STAGES
from ladder_siam.report import figures as report_figures
from ladder_siam.report.comparisons import (
    STAGE_METRICS,
    TASK_METRICS,
    Arm,
    OneSeedIntervals,
    compare_arms,
    format_difference,
    format_mean,
    method_means,
)
from ladder_siam.report.html import Figure, Paragraph, Section, Table
from ladder_siam.report.inputs import RunResults
from ladder_siam.report.statistics import CONFIDENCE
from ladder_siam.runtime.run_folder import run_of

# The metrics compared: Table 7's per-stage probe and kNN, then Table 2's tasks.
METRICS = (*STAGE_METRICS, *TASK_METRICS)


def metric_label(metric: str) -> str:
    """``probe top-1 res3``, ``kNN top-1 res5``, ``box mAP``..."""
    if metric in TASK_METRICS:
        return TASK_METRICS[metric]
    kind, stage = metric.rsplit("_", 1)
    return f"{'probe' if kind == 'probe_top1' else 'kNN'} top-1 {stage}"


def arms_of(runs: list[RunResults]) -> list[Arm]:
    """The runs as arms, each labelled by its method.

    Arms of different pipeline runs (``report_compare_runs``) are never pooled: when the
    runs span several, each method is labelled with its pipeline run too (``ladder-byol
    (sweep-2)``; a run folder of its own by its folder), so that seeds pair only within one
    run's data and schedule. The first arm's label is the baseline.
    """
    groups = {run.uri: _pipeline_run(run.uri) for run in runs}
    several = len(set(groups.values())) > 1
    arms = []
    for run in runs:
        group = groups[run.uri] or run.uri.rstrip("/").rsplit("/", 1)[-1]
        label = f"{run.method} ({group})" if several else run.method
        metrics = {
            f"{kind}_{stage}": run.stage_metric(stage, key)
            for kind, key in (("probe_top1", "top1"), ("knn_top1", "knn_top1"))
            for stage in STAGES
        }
        metrics |= {key: run.metric(key) for key in TASK_METRICS}
        arms.append(Arm(label, run.seed, run.uri, metrics, {"name": run.name}))
    return arms


def _pipeline_run(uri: str) -> str:
    """The pipeline run an arm's folder belongs to; empty for a run folder of its own."""
    run, _, arm = run_of(uri).partition("/")
    return run if arm else ""


def compare(runs: list[RunResults]) -> tuple[list[Arm], list[dict[str, Any]]]:
    """The arms and every comparison with the baseline (see the module docstring)."""
    arms = arms_of(runs)
    return arms, compare_arms(arms, METRICS, OneSeedIntervals())


def comparison_section(arms: list[Arm], comparisons: list[dict[str, Any]]) -> Section:
    """The report's first section: means per method, then each difference and its verdict."""
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
