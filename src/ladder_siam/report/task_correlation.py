"""Correlations between downstream tasks over runs, as the paper's meta-analysis (Fig. 5).

The paper tests Pearson's r between pairs of task scores over methods and, because several
pairs are tested at once, applies Bonferroni's correction: each p-value is multiplied by the
number of pairs tested (capped at 1). Here the "methods" are the report's runs.

A pair is tested only when at least three runs have both scores and neither score is
constant over them: with two points r is always ±1 and its p-value undefined, and a constant
score has no correlation at all. The correction counts only the pairs actually tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy import stats

MIN_RUNS = 3


@dataclass(frozen=True)
class Correlation:
    """Pearson's r between two metrics over the runs that have both.

    Attributes:
        a: The first metric's name.
        b: The second metric's name.
        r: Pearson's correlation coefficient.
        p: The two-sided p-value of r, uncorrected.
        p_bonferroni: ``min(1, p * pairs tested)``.
        n: The number of runs in the test.
    """

    a: str
    b: str
    r: float
    p: float
    p_bonferroni: float
    n: int


def _testable(x: list[float], y: list[float]) -> bool:
    return len(x) >= MIN_RUNS and len(set(x)) > 1 and len(set(y)) > 1


def correlate(metrics: dict[str, list[float | None]]) -> list[Correlation]:
    """Tests every pair of metrics, with Bonferroni-corrected p-values.

    Args:
        metrics: Metric name -> one value per run (None where that run lacks it); every list
            has the same length.

    Returns:
        The tested pairs in the order of ``metrics``; untestable pairs are left out.

    Raises:
        ValueError: The lists differ in length.
    """
    lengths = {len(values) for values in metrics.values()}
    if len(lengths) > 1:
        raise ValueError(f"metrics over different numbers of runs: {sorted(lengths)}")
    tested = []
    for a, b in combinations(metrics, 2):
        pairs = [
            (x, y)
            for x, y in zip(metrics[a], metrics[b], strict=True)
            if x is not None and y is not None
        ]
        x, y = [p[0] for p in pairs], [p[1] for p in pairs]
        if _testable(x, y):
            result = stats.pearsonr(x, y)
            tested.append((a, b, float(result.statistic), float(result.pvalue), len(pairs)))
    return [Correlation(a, b, r, p, min(1.0, p * len(tested)), n) for a, b, r, p, n in tested]


def correlation_matrix(names: list[str], correlations: list[Correlation]) -> np.ndarray:
    """The symmetric ``[len(names)]²`` matrix of r: 1 on the diagonal, NaN where untested."""
    index = {name: i for i, name in enumerate(names)}
    matrix = np.full((len(names), len(names)), math.nan)
    np.fill_diagonal(matrix, 1.0)
    for c in correlations:
        matrix[index[c.a], index[c.b]] = matrix[index[c.b], index[c.a]] = c.r
    return matrix
