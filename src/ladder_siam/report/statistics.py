"""Confidence intervals that say whether a difference between two pretraining methods is real.

Every interval is two-sided at :data:`CONFIDENCE`, on "method minus baseline" in the metric's
own unit (percentage points for accuracy and mIoU). Which one is used depends on the data:

* Several seeds per method: the paired t interval (Student 1908) over per-seed differences,
  :func:`t_interval`.
* One seed, classifiers scored on the same test images: the exact interval conditional on the
  discordant images, which matches the exact McNemar (1947) test and is built on Clopper &
  Pearson (1934), :func:`paired_accuracy_interval`.
* One seed, segmenters scored on the same images: mIoU is not a mean over images, so a paired
  percentile bootstrap over images (Efron 1979), :func:`miou_difference_interval`.

Only numpy and the standard library are used (the t and beta quantiles come from the
regularized incomplete beta function, Numerical Recipes 3rd ed. §6.4), so the module runs on a
bare GPU image without scipy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
NOT_DISTINGUISHABLE = f"not distinguishable at {round(CONFIDENCE * 100)} %"

_EPS = 1e-15  # relative accuracy of the continued fraction and of the root finds
_TINY = 1e-300  # Lentz's guard against a zero denominator
_MAX_ITER = 10_000  # the continued fraction needs O(sqrt(max(a, b))) terms


@dataclass(frozen=True)
class Interval:
    """A difference between two methods (method minus baseline) and its confidence interval.

    Attributes:
        difference: The point estimate.
        low: The interval's lower end.
        high: The interval's upper end.
        method: How it was made, for the report, e.g. "paired t over 3 seeds".
    """

    difference: float
    low: float
    high: float
    method: str


def _betacf(a: float, b: float, x: float) -> float:
    # Modified Lentz evaluation of the continued fraction for I_x(a, b) (NR ``betacf``).
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_ITER + 1):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def _betai(a: float, b: float, x: float, y: float) -> float:
    # I_x(a, b), with y = 1 - x passed in exactly so that x near 1 keeps its precision.
    if x <= 0.0 or y <= 0.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    log_front += a * math.log(x) + b * math.log(y)
    # The fraction converges fast only below (a + 1) / (a + b + 2); use symmetry above it.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def _solve_increasing(
    g: Callable[[float], float], slope: Callable[[float], float], lo: float, hi: float, x: float
) -> float:
    # Newton's method inside a bracket that always holds the root; a step that would leave it
    # bisects instead, so it converges however poor Newton's start is.
    for _ in range(_MAX_ITER):
        gx = g(x)
        if gx == 0.0:
            return x
        lo, hi = (x, hi) if gx < 0.0 else (lo, x)
        s = slope(x)
        new = x - gx / s if s > 0.0 and math.isfinite(s) else math.nan
        if not lo < new < hi:
            new = 0.5 * (lo + hi)
        if abs(new - x) <= _EPS * abs(new) or new in (lo, hi):
            return new
        x = new
    return x


def student_t_quantile(p: float, df: float) -> float:
    """The Student-t inverse CDF: ``t`` with ``P(T <= t) = p`` for ``df`` degrees of freedom.

    Raises:
        ValueError: Unless 0 < p < 1 and df > 0 (df need not be an integer).
    """
    if not 0.0 < p < 1.0 or not df > 0.0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p == 0.5:
        return 0.0
    q = min(p, 1.0 - p)  # solve in the upper tail, where P(T > t) is small, then add the sign

    def tail(t: float) -> float:  # P(T > t) = I_{df/(df+t²)}(df/2, 1/2) / 2 for t >= 0
        return 0.5 * _betai(0.5 * df, 0.5, df / (df + t * t), t * t / (df + t * t))

    log_norm = math.lgamma(0.5 * (df + 1)) - math.lgamma(0.5 * df) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:  # the slope of q - tail(t)
        return math.exp(log_norm - 0.5 * (df + 1) * math.log1p(t * t / df))

    hi = 1.0
    while tail(hi) > q:  # grow a bracket; heavy tails (df = 1) can need a large one
        hi *= 2.0
    t = _solve_increasing(lambda t: q - tail(t), density, 0.0, hi, hi)
    return t if p > 0.5 else -t


def beta_quantile(p: float, a: float, b: float) -> float:
    """The Beta(a, b) inverse CDF: ``x`` with ``I_x(a, b) = p``.

    Raises:
        ValueError: Unless 0 <= p <= 1, a > 0 and b > 0.
    """
    if not 0.0 <= p <= 1.0 or not (a > 0.0 and b > 0.0):
        raise ValueError(f"need 0 <= p <= 1, a > 0, b > 0, got p={p}, a={a}, b={b}")
    if p in (0.0, 1.0):
        return p
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    def density(x: float) -> float:
        return math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - log_beta)

    return _solve_increasing(lambda x: _betai(a, b, x, 1.0 - x) - p, density, 0.0, 1.0, a / (a + b))


def mean_and_standard_error(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and its standard error, sample sd / √n (None for fewer than two values).

    Raises:
        ValueError: ``values`` is empty.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("the mean of no values is undefined")
    if x.size < 2:
        return float(x[0]), None
    if np.ptp(x) == 0:  # summation rounding would report a spurious ~1e-16 spread
        return float(x[0]), 0.0
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def t_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The paired t interval, mean ± t_{(1+c)/2, n−1}·s/√n, over per-seed differences.

    ``differences`` holds method minus baseline per seed, seed i of each method paired.

    Raises:
        ValueError: Fewer than two differences, so there is no spread to estimate.
    """
    n = len(differences)
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 paired seeds, got {n}")
    mean, se = mean_and_standard_error(differences)
    half = student_t_quantile(0.5 * (1.0 + confidence), n - 1) * (se or 0.0)
    return Interval(mean, mean - half, mean + half, f"paired t over {n} seeds")


def clopper_pearson(
    successes: int, trials: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The exact interval for a binomial proportion (Clopper & Pearson 1934).

    The ends are the Beta(k, n−k+1) quantile at (1−c)/2 and the Beta(k+1, n−k) one at
    (1+c)/2, with 0 and 1 at the edges k = 0 and k = n; no trials give (0, 1).

    Raises:
        ValueError: Unless 0 <= successes <= trials.
    """
    k, n = successes, trials
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= successes <= trials, got {k} of {n}")
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else beta_quantile(alpha / 2, k, n - k + 1)
    high = 1.0 if k == n else beta_quantile(1 - alpha / 2, k + 1, n - k)
    return low, high


def _as_correct(name: str, values: np.ndarray | Sequence[bool]) -> np.ndarray:
    x = np.asarray(values)
    if x.ndim != 1 or not np.isin(x, (0, 1)).all():
        raise ValueError(f"{name} must be a 1-D array of booleans")
    return x.astype(bool)


def paired_accuracy_interval(
    correct: np.ndarray | Sequence[bool],
    baseline_correct: np.ndarray | Sequence[bool],
    confidence: float = CONFIDENCE,
) -> Interval:
    """The accuracy difference, in points, of two classifiers on the same test images.

    Only discordant images carry information (McNemar 1947). Of the m = b + c of them, b are
    right only for ``correct``; given m, b ~ Binomial(m, π) and the difference is
    100·m·(2π − 1)/n, so the Clopper–Pearson interval for π maps onto it. ``correct`` and
    ``baseline_correct`` say per image whether each is right, same images in the same order.

    Raises:
        ValueError: The arrays are not boolean, differ in length or are empty.
    """
    ours, theirs = _as_correct("correct", correct), _as_correct("baseline", baseline_correct)
    n = ours.size
    if theirs.size != n or n == 0:
        raise ValueError(f"need equal non-zero lengths, got {n} and {theirs.size}")
    b, c = int(np.sum(ours & ~theirs)), int(np.sum(~ours & theirs))
    method = f"exact paired (McNemar) over {n} images"
    if b + c == 0:
        return Interval(0.0, 0.0, 0.0, method)
    low, high = clopper_pearson(b, b + c, confidence)
    scale = 100.0 * (b + c) / n
    return Interval(100.0 * (b - c) / n, scale * (2 * low - 1), scale * (2 * high - 1), method)


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """The percentile bootstrap interval (Efron 1979) of a statistic over n items.

    ``statistic`` maps an int index array (n items drawn with replacement) to a value; the
    draws come from a numpy Generator seeded with ``seed``, so the interval is reproducible.

    Raises:
        ValueError: ``n`` or ``resamples`` is below 1.
    """
    if n < 1 or resamples < 1:
        raise ValueError(f"need n >= 1 and resamples >= 1, got n={n}, resamples={resamples}")
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, size=n)) for _ in range(resamples)]
    low, high = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def _miou_of_sums(inter: np.ndarray, uni: np.ndarray) -> float:
    # A class with zero union is absent from both prediction and ground truth: no IoU exists.
    present = uni > 0
    if not present.any():
        raise ValueError("no class has a non-zero union")
    return float(100.0 * np.mean(inter[present] / uni[present]))


def mean_iou(intersection: np.ndarray, union: np.ndarray) -> float:
    """The mIoU in percent of per-image, per-class pixel counts ([images, classes]).

    100 × the mean, over classes whose summed union is above 0, of Σ intersection / Σ union:
    counts are summed over the images first (the dataset-level IoU).
    """
    inter = np.asarray(intersection, dtype=float).sum(axis=0)
    return _miou_of_sums(inter, np.asarray(union, dtype=float).sum(axis=0))


def miou_difference_interval(
    intersection: np.ndarray,
    union: np.ndarray,
    baseline_intersection: np.ndarray,
    baseline_union: np.ndarray,
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Interval:
    """The mIoU difference, in points, of two segmenters on the same images.

    Inputs are per-image, per-class pixel counts, [images, classes], the baseline's for the
    same images in the same order. Both are resampled with the same image indices (a paired
    bootstrap), so the interval reflects the paired design, not two independent samples.

    Raises:
        ValueError: The arrays are not 2-D of one shape, or there are no images.
    """
    arrays = [np.asarray(a, dtype=float) for a in (intersection, union)]
    arrays += [np.asarray(a, dtype=float) for a in (baseline_intersection, baseline_union)]
    shape = arrays[0].shape
    if len(shape) != 2 or shape[0] == 0 or any(a.shape != shape for a in arrays):
        raise ValueError(f"need four [images, classes] arrays of one shape, got {shape}")
    inter, uni, base_inter, base_uni = arrays

    def difference(index: np.ndarray) -> float:
        # Weighting images by how often they were drawn is the same as summing the resample.
        w = np.bincount(index, minlength=shape[0]).astype(float)
        return _miou_of_sums(w @ inter, w @ uni) - _miou_of_sums(w @ base_inter, w @ base_uni)

    point = mean_iou(inter, uni) - mean_iou(base_inter, base_uni)
    low, high = bootstrap_interval(difference, shape[0], resamples, seed, confidence)
    return Interval(point, low, high, f"bootstrap over {shape[0]} images")


def verdict(low: float, high: float) -> str:
    """Reads an interval on method minus baseline: "better", "worse" or not distinguishable.

    Returns:
        "better" if ``low`` > 0, "worse" if ``high`` < 0, else :data:`NOT_DISTINGUISHABLE`.
    """
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return NOT_DISTINGUISHABLE
