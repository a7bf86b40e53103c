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

from ladder_siam.nets.archs import STAGES
from ladder_siam.report.statistics import (
    Interval,
    mean_and_standard_error,
    t_interval,
    verdict,
)

# The per-stage metrics of the paper's Table 7 (linear probe and kNN on each stage).
STAGE_METRICS = tuple(f"{kind}_{stage}" for kind in ("probe_top1", "knn_top1") for stage in STAGES)
NO_INTERVAL = "one seed: no interval"
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
            raise ValueError(f"two runs of {arm.method} with seed {arm.seed}: {arm.run}")
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
    interval: Interval | None
    if len(pairs) >= 2:
        interval = t_interval(differences)
    else:
        interval = one_seed(metric, *pairs[0]) if one_seed is not None else None
    entry: dict[str, Any] = {
        "metric": metric,
        "method": method,
        "baseline": baseline,
        "seeds": sorted(arm.seed for arm, _ in pairs),
        "difference": round(sum(differences) / len(differences), DECIMALS),
    }
    if interval is None:
        return {**entry, "ci95": None, "interval": NO_INTERVAL, "verdict": NO_INTERVAL}
    return {
        **entry,
        "ci95": [round(interval.low, DECIMALS), round(interval.high, DECIMALS)],
        "interval": interval.method,
        "verdict": verdict(interval.low, interval.high),
    }


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
