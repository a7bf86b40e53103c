"""The report's confidence intervals, checked against scipy (which the module must not need)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from ladder_siam.report import statistics
from ladder_siam.report.statistics import (
    CONFIDENCE,
    NOT_DISTINGUISHABLE,
    Interval,
    beta_quantile,
    bootstrap_interval,
    clopper_pearson,
    mean_and_standard_error,
    mean_iou,
    miou_difference_interval,
    paired_accuracy_interval,
    student_t_quantile,
    t_interval,
    verdict,
)


def test_module_does_not_import_scipy_or_torch() -> None:
    source = Path(statistics.__file__).read_text(encoding="utf-8")
    for banned in ("scipy", "torch"):
        assert f"import {banned}" not in source
        assert f"from {banned}" not in source


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 29, 100])
@pytest.mark.parametrize("p", [0.975, 0.5, 0.025, 0.999, 0.001, 0.9, 0.6, 1e-6])
def test_student_t_quantile_matches_scipy(df: int, p: float) -> None:
    expected = stats.t.ppf(p, df)
    assert student_t_quantile(p, df) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_student_t_quantile_takes_fractional_df_and_rejects_bad_arguments() -> None:
    assert student_t_quantile(0.95, 2.5) == pytest.approx(stats.t.ppf(0.95, 2.5), rel=1e-9)
    for p, df in [(0.0, 3), (1.0, 3), (0.5, 0), (0.9, -1)]:
        with pytest.raises(ValueError):
            student_t_quantile(p, df)


@pytest.mark.parametrize(("a", "b"), [(1, 1), (0.5, 0.5), (2, 30), (30, 2), (400, 600)])
@pytest.mark.parametrize("p", [0.025, 0.5, 0.975])
def test_beta_quantile_matches_scipy(a: float, b: float, p: float) -> None:
    assert beta_quantile(p, a, b) == pytest.approx(stats.beta.ppf(p, a, b), rel=1e-9, abs=1e-13)


def test_mean_and_standard_error() -> None:
    assert mean_and_standard_error([2.0]) == (2.0, None)
    mean, se = mean_and_standard_error([1.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert se == pytest.approx(stats.sem([1.0, 2.0, 6.0]))
    with pytest.raises(ValueError):
        mean_and_standard_error([])


@pytest.mark.parametrize(
    "differences",
    [[0.4, 1.1], [-2.0, 3.5], [0.3, -0.1, 0.5], [1.2, 0.9, 1.6], [1.0, 2.0, 3.0, 4.0, 5.5]],
)
def test_t_interval_matches_scipy(differences: list[float]) -> None:
    expected = stats.ttest_1samp(differences, 0.0).confidence_interval(0.95)
    interval = t_interval(differences)
    assert interval.difference == pytest.approx(np.mean(differences))
    assert interval.low == pytest.approx(expected.low, rel=1e-9)
    assert interval.high == pytest.approx(expected.high, rel=1e-9)
    assert interval.method == f"paired t over {len(differences)} seeds"


def test_t_interval_needs_two_seeds_and_handles_zero_spread() -> None:
    for differences in ([], [1.5]):
        with pytest.raises(ValueError, match="at least 2"):
            t_interval(differences)
    assert t_interval([0.7, 0.7, 0.7]) == Interval(0.7, 0.7, 0.7, "paired t over 3 seeds")


@pytest.mark.parametrize("trials", [1, 2, 7, 20, 100, 1000])
def test_clopper_pearson_matches_scipy(trials: int) -> None:
    for successes in sorted({0, 1, trials // 3, trials // 2, trials - 1, trials}):
        expected = stats.binomtest(successes, trials).proportion_ci(
            confidence_level=0.95, method="exact"
        )
        low, high = clopper_pearson(successes, trials)
        assert low == pytest.approx(expected.low, rel=1e-9, abs=1e-12)
        assert high == pytest.approx(expected.high, rel=1e-9, abs=1e-12)
    assert clopper_pearson(0, trials)[0] == 0.0
    assert clopper_pearson(trials, trials)[1] == 1.0


def test_clopper_pearson_edges() -> None:
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    for successes, trials in [(-1, 5), (6, 5)]:
        with pytest.raises(ValueError):
            clopper_pearson(successes, trials)


def _pairs(both: int, only_ours: int, only_baseline: int, neither: int) -> tuple[np.ndarray, ...]:
    ours = [True] * both + [True] * only_ours + [False] * only_baseline + [False] * neither
    theirs = [True] * both + [False] * only_ours + [True] * only_baseline + [False] * neither
    order = np.random.default_rng(1).permutation(len(ours))
    return np.array(ours)[order], np.array(theirs)[order]


def test_paired_accuracy_interval_by_hand() -> None:
    ours, theirs = _pairs(both=140, only_ours=30, only_baseline=12, neither=18)
    n, b, c = 200, 30, 12
    ci = stats.binomtest(b, b + c).proportion_ci(confidence_level=0.95, method="exact")
    interval = paired_accuracy_interval(ours, theirs)
    assert interval.difference == pytest.approx(100 * (ours.mean() - theirs.mean()))
    assert interval.difference == pytest.approx(100 * (b - c) / n)
    assert interval.low == pytest.approx(100 * (b + c) * (2 * ci.low - 1) / n, rel=1e-9)
    assert interval.high == pytest.approx(100 * (b + c) * (2 * ci.high - 1) / n, rel=1e-9)
    assert interval.method == "exact paired (McNemar) over 200 images"
    # Swapping the two classifiers mirrors the interval.
    swapped = paired_accuracy_interval(theirs, ours)
    assert swapped.low == pytest.approx(-interval.high)
    assert swapped.high == pytest.approx(-interval.low)


def test_paired_accuracy_interval_identical_and_invalid() -> None:
    ours = np.random.default_rng(0).random(500) < 0.7
    assert paired_accuracy_interval(ours, ours.copy()) == Interval(
        0.0, 0.0, 0.0, "exact paired (McNemar) over 500 images"
    )
    with pytest.raises(ValueError):
        paired_accuracy_interval(ours, ours[:-1])
    with pytest.raises(ValueError):
        paired_accuracy_interval([], [])
    with pytest.raises(ValueError):
        paired_accuracy_interval([0.5, 1.0], [1.0, 1.0])


def test_paired_accuracy_verdicts() -> None:
    better = _pairs(both=7000, only_ours=300, only_baseline=200, neither=2500)
    interval = paired_accuracy_interval(*better)
    assert interval.difference == pytest.approx(1.0)
    assert interval.low > 0
    assert verdict(interval.low, interval.high) == "better"
    assert verdict(*_low_high(paired_accuracy_interval(better[1], better[0]))) == "worse"
    tiny = paired_accuracy_interval(*_pairs(7000, 252, 248, 2500))
    assert tiny.low < 0 < tiny.high
    assert verdict(tiny.low, tiny.high) == NOT_DISTINGUISHABLE


def _low_high(interval: Interval) -> tuple[float, float]:
    return interval.low, interval.high


def test_paired_accuracy_interval_covers_a_zero_difference() -> None:
    # Exact intervals are conservative: with equal accuracies 0 should be inside ≥ 95 % of
    # the time (allowing for simulation noise on 400 repetitions).
    rng = np.random.default_rng(7)
    repetitions, n = 400, 60
    covered = 0
    for _ in range(repetitions):
        ours, theirs = rng.random(n) < 0.7, rng.random(n) < 0.7
        interval = paired_accuracy_interval(ours, theirs)
        covered += interval.low <= 0.0 <= interval.high
    assert covered / repetitions >= 0.93


def test_bootstrap_interval_is_deterministic_and_sensible() -> None:
    values = np.random.default_rng(3).normal(10.0, 2.0, size=200)

    def mean(index: np.ndarray) -> float:
        return float(values[index].mean())

    first = bootstrap_interval(mean, values.size, resamples=1000, seed=5)
    assert first == bootstrap_interval(mean, values.size, resamples=1000, seed=5)
    assert first != bootstrap_interval(mean, values.size, resamples=1000, seed=6)
    # For a mean, the percentile interval is close to the normal one, mean ± 1.96 s.e.
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert first[0] < values.mean() < first[1]
    assert (first[1] - first[0]) / 2 == pytest.approx(half, rel=0.15)
    with pytest.raises(ValueError):
        bootstrap_interval(mean, 0)


def test_mean_iou_ignores_classes_with_zero_union() -> None:
    intersection = np.array([[1, 0, 0], [2, 0, 0]])
    union = np.array([[2, 0, 0], [2, 1, 0]])
    # Class 0: 3 / 4; class 1: 0 / 1; class 2 never appears and is left out.
    assert mean_iou(intersection, union) == pytest.approx(100 * (0.75 + 0.0) / 2)
    with pytest.raises(ValueError):
        mean_iou(np.zeros((2, 3)), np.zeros((2, 3)))


def _segmenter(rng: np.random.Generator, quality: float, images: int = 80, classes: int = 5):
    union = rng.integers(50, 200, size=(images, classes)).astype(float)
    union[rng.random((images, classes)) < 0.3] = 0  # a class absent from an image
    intersection = np.floor(union * np.clip(rng.normal(quality, 0.1, union.shape), 0, 1))
    return intersection, union


def test_miou_difference_interval() -> None:
    rng = np.random.default_rng(11)
    good, base = _segmenter(rng, 0.7), _segmenter(rng, 0.6)
    interval = miou_difference_interval(*good, *base, resamples=500, seed=2)
    assert interval.difference == pytest.approx(mean_iou(*good) - mean_iou(*base))
    assert interval.low < interval.difference < interval.high
    assert interval.method == "bootstrap over 80 images"
    assert verdict(interval.low, interval.high) == "better"
    assert interval == miou_difference_interval(*good, *base, resamples=500, seed=2)
    assert interval != miou_difference_interval(*good, *base, resamples=500, seed=3)

    same = miou_difference_interval(*good, *good, resamples=200)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)

    # Two draws of the same segmenter quality on the same images: nothing to tell apart.
    noisy = (np.floor(good[1] * np.clip(rng.normal(0.7, 0.1, good[1].shape), 0, 1)), good[1])
    close = miou_difference_interval(*noisy, *good, resamples=500)
    assert verdict(close.low, close.high) == NOT_DISTINGUISHABLE
    with pytest.raises(ValueError):
        miou_difference_interval(*good, base[0][:-1], base[1][:-1])


def test_verdict() -> None:
    assert verdict(0.1, 2.0) == "better"
    assert verdict(-2.0, -0.1) == "worse"
    assert verdict(-0.5, 0.5) == NOT_DISTINGUISHABLE
    assert verdict(0.0, 1.0) == NOT_DISTINGUISHABLE
    assert NOT_DISTINGUISHABLE == "not distinguishable at 95 %"
    assert CONFIDENCE == 0.95
