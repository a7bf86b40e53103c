"""Methods compared over seeds: which differences from the baseline are real.

An *arm* is one pretraining run: a method and a seed, with its metrics in percent. The first
method is the baseline. For every metric and every other method, :func:`compare_arms` gives
the difference from the baseline and a 95 % interval:

* with two or more seeds, the mean of the per-seed differences (the same seed pairs the two
  arms: same data order and initialisation) with a t-interval over the seeds
  (:func:`~ladder_siam.report.statistics.t_interval`);
* with one seed, the test set's own sampling error where the caller can compute it exactly
  and cheaply (``one_seed``: an exact paired test for accuracies, a bootstrap over images for
  mIoU), else none, said in so many words.

The verdict reads the interval: better, worse, or not distinguishable at 95 %. The report
(``summary.json``'s ``comparisons``) and ``benchmarks/reproduce_fashion_mnist.py`` both write
these entries, so a pipeline run and a GPU reproduction read alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ladder_siam.errors import UsageError
from ladder_siam.nets.archs import STAGES
from ladder_siam.report.statistics import (
    Interval,
    mean_and_standard_error,
    miou_difference_interval,
    paired_accuracy_interval,
    t_interval,
    verdict,
)
from ladder_siam.runtime.per_image import PerImage, read_per_image
from ladder_siam.runtime.run_folder import RunFolder

# The per-stage metrics of the paper's Table 7 (linear probe and kNN on each stage).
STAGE_METRICS = tuple(f"{kind}_{stage}" for kind in ("probe_top1", "knn_top1") for stage in STAGES)
# Table 2's tasks.
TASK_METRICS = {"box_ap": "box mAP", "mask_ap": "mask mAP", "miou": "mIoU"}
NO_INTERVAL = "one seed: no interval"
# Every seed gave the same nonzero difference (a coarse metric, e.g. mAP in 0.1 steps): a
# t-interval of width 0 would claim a certainty that two or three seeds cannot give.
NO_SPREAD = "no spread over seeds: no interval"
# Where each metric's per-image results are: the evaluation that wrote them.
_EVALUATION = {**dict.fromkeys(STAGE_METRICS, "linear_probe"), "miou": "segmentation"}
# How closely per-image results must reproduce a difference of the metrics (in points).
_AGREE = 0.005
# Decimals of metrics and differences in percent, in JSON and on the page alike.
DECIMALS = 2


@dataclass(frozen=True)
class Arm:
    """One pretraining run of a comparison.

    Attributes:
        method: The pretraining method (its name or level string).
        seed: The pretraining seed; arms of two methods with one seed are paired.
        run: The run's folder.
        metrics: Metric name -> value in percent; None where the evaluation did not run.
        extra: Anything else a writer keeps with the arm (times, settings).
    """

    method: str
    seed: int
    run: str
    metrics: dict[str, float | None]
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The arm as ``summary.json`` lists it."""
        metrics = {k: None if v is None else round(v, DECIMALS) for k, v in self.metrics.items()}
        return {"method": self.method, "seed": self.seed, "run": self.run, **self.extra,
                "metrics": metrics}  # fmt: skip


# (metric, arm, baseline arm) -> the one-seed interval, or None where there is no exact one.
OneSeedInterval = Callable[[str, Arm, Arm], Interval | None]


def methods_of(arms: Sequence[Arm]) -> list[str]:
    """The methods in the order they first appear; the first is the baseline."""
    return list(dict.fromkeys(arm.method for arm in arms))


def check_arms(arms: Sequence[Arm]) -> None:
    """Refuses a comparison that cannot be paired.

    Raises:
        ValueError: Two arms with the same method and seed.
    """
    seen: set[tuple[str, int]] = set()
    for arm in arms:
        if (arm.method, arm.seed) in seen:
            raise UsageError(f"two runs of {arm.method} with seed {arm.seed}: {arm.run}")
        seen.add((arm.method, arm.seed))


def compare_arms(
    arms: Sequence[Arm], metrics: Sequence[str], one_seed: OneSeedInterval | None = None
) -> list[dict[str, Any]]:
    """Every other method against the baseline (the first method), per metric.

    Args:
        arms: The runs; the first arm's method is the baseline.
        metrics: The metric names to compare, in the order to list them.
        one_seed: Gives the test set's interval for a single pair of arms, when it exists.

    Returns:
        One entry per (metric, method) that both sides measured with a shared seed:
        ``metric``, ``method``, ``baseline``, ``seeds``, ``difference``, ``ci95`` (``[low,
        high]`` or None), ``interval`` (how it was computed) and ``verdict``.
    """
    check_arms(arms)
    methods = methods_of(arms)
    if not methods:
        return []
    baseline, others = methods[0], methods[1:]
    by_key = {(arm.method, arm.seed): arm for arm in arms}
    comparisons = []
    for metric in metrics:
        for method in others:
            pairs = [
                (by_key[(method, seed)], base)
                for (name, seed), base in by_key.items()
                if name == baseline
                and (method, seed) in by_key
                and base.metrics.get(metric) is not None
                and by_key[(method, seed)].metrics.get(metric) is not None
            ]
            if pairs:
                comparisons.append(_compare(metric, method, baseline, pairs, one_seed))
    return comparisons


def _compare(
    metric: str,
    method: str,
    baseline: str,
    pairs: list[tuple[Arm, Arm]],
    one_seed: OneSeedInterval | None,
) -> dict[str, Any]:
    differences = [arm.metrics[metric] - base.metrics[metric] for arm, base in pairs]  # type: ignore[operator]
    entry: dict[str, Any] = {
        "metric": metric,
        "method": method,
        "baseline": baseline,
        "seeds": sorted(arm.seed for arm, _ in pairs),
        "difference": round(sum(differences) / len(differences), DECIMALS),
    }
    interval: Interval | None = None
    reason = NO_INTERVAL
    if len(pairs) >= 2:
        # The same nonzero difference on every seed has no spread to build an interval from.
        spread = len(set(differences)) > 1 or not any(differences)
        interval = t_interval(differences) if spread else None
        reason = NO_SPREAD
    elif one_seed is not None:
        interval = one_seed(metric, *pairs[0])
    if interval is None:
        return {**entry, "ci95": None, "interval": reason, "verdict": reason}
    # The verdict reads the interval as shown, so that the page never contradicts itself.
    low, high = round(interval.low, DECIMALS), round(interval.high, DECIMALS)
    return {
        **entry,
        "ci95": [low, high],
        "interval": interval.method,
        "verdict": verdict(low, high),
    }


class OneSeedIntervals:
    """The test set's interval for one pair of arms, where both recorded per-image results.

    The evaluations write ``per_image.json`` (:mod:`ladder_siam.runtime.per_image`): which val
    images the probe and kNN got right (an exact paired test of the accuracies) and each
    image's pixel counts (a paired bootstrap of mIoU). Each file is read once per comparison.
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


def method_means(arms: Sequence[Arm], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method and metric: ``{"mean", "se", "n"}`` over its seeds (se None for one seed)."""
    table: dict[str, dict[str, Any]] = {}
    for method in methods_of(arms):
        table[method] = {}
        for metric in metrics:
            values = [
                value
                for arm in arms
                if arm.method == method and (value := arm.metrics.get(metric)) is not None
            ]
            if not values:
                table[method][metric] = None
                continue
            mean, se = mean_and_standard_error(values)
            table[method][metric] = {
                "mean": round(mean, DECIMALS),
                "se": None if se is None else round(se, DECIMALS),
                "n": len(values),
            }
    return table


def format_mean(cell: dict[str, Any] | None) -> str:
    """``mean ± s.e.`` (or the mean alone for one seed), in the report's decimals."""
    if cell is None:
        return "–"
    if cell["se"] is None:
        return f"{cell['mean']:.{DECIMALS}f}"
    return f"{cell['mean']:.{DECIMALS}f} ± {cell['se']:.{DECIMALS}f}"


def format_difference(entry: dict[str, Any]) -> str:
    """``+1.23 [+0.45, +2.01]``, or the bare difference with the reason there is no interval."""
    if entry["ci95"] is None:
        return f"{entry['difference']:+.{DECIMALS}f} (no interval)"
    low, high = entry["ci95"]
    return f"{entry['difference']:+.{DECIMALS}f} [{low:+.{DECIMALS}f}, {high:+.{DECIMALS}f}]"
