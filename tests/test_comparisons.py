"""Methods x seeds: the paired differences, their intervals and verdicts."""

import pytest
from scipy import stats

from ladder_siam.report.comparisons import (
    NO_INTERVAL,
    NO_SPREAD,
    Arm,
    compare_arms,
    format_difference,
    format_mean,
    method_means,
)
from ladder_siam.report.statistics import Interval


def arm(method, seed, **metrics):
    return Arm(method, seed, f"runs/{method}-{seed}", metrics)


def test_seeds_pair_the_arms_and_give_a_t_interval_over_the_differences():
    byol = {0: 70.0, 1: 72.0, 2: 71.0}
    ladder = {0: 71.5, 1: 72.9, 2: 72.8}
    # Listed out of order: pairing is by seed, not by position.
    arms = [arm("byol", s, probe_top1_res3=v) for s, v in byol.items()]
    arms += [arm("ladder-byol", s, probe_top1_res3=ladder[s]) for s in (2, 0, 1)]
    [entry] = compare_arms(arms, ["probe_top1_res3"])
    differences = [ladder[s] - byol[s] for s in (0, 1, 2)]
    low, high = stats.ttest_1samp(differences, 0).confidence_interval(0.95)
    assert entry["metric"] == "probe_top1_res3"
    assert (entry["method"], entry["baseline"], entry["seeds"]) == (
        "ladder-byol",
        "byol",
        [0, 1, 2],
    )
    assert entry["difference"] == pytest.approx(sum(differences) / 3, abs=0.005)
    assert entry["ci95"] == pytest.approx([low, high], abs=0.005)
    assert entry["verdict"] == "better"
    assert "3 seeds" in entry["interval"]


def test_a_noisy_difference_is_not_distinguishable_and_a_consistent_drop_is_worse():
    arms = [
        arm("byol", 0, a=70.0, b=70.0),
        arm("byol", 1, a=71.0, b=71.0),
        arm("ladder-byol", 0, a=72.0, b=69.0),
        arm("ladder-byol", 1, a=70.5, b=69.9),
    ]
    verdicts = {e["metric"]: e["verdict"] for e in compare_arms(arms, ["a", "b"])}
    assert verdicts["a"].startswith("not distinguishable")
    assert verdicts["b"] == "worse"


def test_one_seed_uses_the_callers_exact_interval_or_says_there_is_none():
    arms = [arm("byol", 0, top=70.0, map=30.0), arm("ladder-byol", 0, top=71.0, map=31.0)]
    calls = []

    def one_seed(metric, candidate, baseline):
        calls.append((metric, candidate.method, baseline.method))
        return Interval(1.0, 0.2, 1.8, "exact") if metric == "top" else None

    entries = {e["metric"]: e for e in compare_arms(arms, ["top", "map"], one_seed)}
    assert calls == [("top", "ladder-byol", "byol"), ("map", "ladder-byol", "byol")]
    assert entries["top"]["ci95"] == [0.2, 1.8] and entries["top"]["verdict"] == "better"
    assert entries["map"]["ci95"] is None and entries["map"]["verdict"] == NO_INTERVAL
    assert format_difference(entries["map"]) == "+1.00 (no interval)"
    assert format_difference(entries["top"]) == "+1.00 [+0.20, +1.80]"


def test_only_seeds_both_methods_measured_are_compared():
    arms = [
        arm("byol", 0, m=70.0),
        arm("byol", 1, m=71.0),
        arm("byol", 2, m=None),
        arm("ladder-byol", 0, m=71.0),
        arm("ladder-byol", 2, m=72.0),
        arm("dense-byol", 5, m=60.0),
    ]
    entries = compare_arms(arms, ["m"])
    # ladder-byol shares only seed 0 with a measured baseline; dense-byol shares no seed.
    assert [(e["method"], e["seeds"]) for e in entries] == [("ladder-byol", [0])]


def test_a_repeated_method_and_seed_is_refused():
    with pytest.raises(ValueError, match="two runs of byol with seed 0"):
        compare_arms([arm("byol", 0, m=1.0), arm("byol", 0, m=2.0)], ["m"])


def test_method_means_give_mean_and_standard_error_over_seeds():
    arms = [arm("byol", s, m=v) for s, v in enumerate((70.0, 72.0, 74.0))]
    arms.append(arm("ladder-byol", 0, m=71.0))
    table = method_means(arms, ["m", "absent"])
    assert table["byol"]["m"] == {"mean": 72.0, "se": pytest.approx(1.1547, abs=0.005), "n": 3}
    assert table["ladder-byol"]["m"] == {"mean": 71.0, "se": None, "n": 1}
    assert table["byol"]["absent"] is None
    assert format_mean(table["byol"]["m"]) == "72.00 ± 1.15"
    assert format_mean(table["ladder-byol"]["m"]) == "71.00"


def test_the_same_difference_on_every_seed_gets_no_zero_width_interval():
    # mAP moves in coarse steps: two seeds can agree exactly, which proves nothing.
    arms = [arm("byol", s, m=30.0) for s in (0, 1)] + [
        arm("ladder-byol", s, m=30.5) for s in (0, 1)
    ]
    [entry] = compare_arms(arms, ["m"])
    assert entry["difference"] == 0.5
    assert entry["ci95"] is None and entry["verdict"] == NO_SPREAD
    # No difference at all on every seed (both at 0 mAP): nothing to tell apart.
    same = [arm("byol", s, m=0.0) for s in (0, 1)] + [arm("ladder-byol", s, m=0.0) for s in (0, 1)]
    [entry] = compare_arms(same, ["m"])
    assert entry["ci95"] == [0.0, 0.0] and entry["verdict"].startswith("not distinguishable")


def test_the_verdict_reads_the_interval_as_shown():
    arms = [arm("byol", 0, m=50.0), arm("ladder-byol", 0, m=50.004)]
    # Rounded to 2 decimals, the low end is 0.00: the page must not say "better" beside it.
    [entry] = compare_arms(arms, ["m"], lambda *_: Interval(0.004, 0.001, 0.008, "exact"))
    assert entry["ci95"] == [0.0, 0.01] and entry["verdict"].startswith("not distinguishable")
