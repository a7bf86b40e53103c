"""Learning-rate and EMA-rate schedules: endpoints, shape, formulas and argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from ladder_siam.runtime.schedules import ema_tau, epochs_to_steps, steps_per_epoch, warmup_cosine


def test_warmup_cosine_endpoints_and_midpoint() -> None:
    schedule = warmup_cosine(peak=7.2, total_steps=111, warmup_steps=10, final=0.2)
    assert schedule.shape == (111,)
    assert schedule.dtype == torch.float64
    assert schedule[0].item() == pytest.approx(0.72)
    assert schedule[9].item() == pytest.approx(7.2)
    assert schedule[10].item() == pytest.approx(7.2)
    # 101 cosine steps: the middle one (j = 50) is halfway between peak and final.
    assert schedule[60].item() == pytest.approx((7.2 + 0.2) / 2)
    assert schedule[-1].item() == pytest.approx(0.2)


def test_warmup_cosine_is_increasing_then_decreasing() -> None:
    schedule = warmup_cosine(peak=1.0, total_steps=50, warmup_steps=20)
    assert torch.all(schedule[1:20] > schedule[:19])
    assert torch.all(schedule[21:] <= schedule[20:-1])
    assert schedule.min().item() == 0.0
    assert schedule.max().item() == pytest.approx(1.0)


def test_warmup_cosine_follows_the_cosine_formula() -> None:
    schedule = warmup_cosine(peak=2.0, total_steps=30, warmup_steps=5)
    for k in range(5, 30):
        expected = 2.0 * (1 + math.cos(math.pi * (k - 5) / 24)) / 2
        assert schedule[k].item() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("total", "warmup", "expected"),
    [(4, 0, [1.0, 0.75, 0.25, 0.0]), (3, 3, [1 / 3, 2 / 3, 1.0]), (1, 0, [1.0]), (1, 1, [1.0])],
)
def test_warmup_cosine_edge_lengths(total: int, warmup: int, expected: list[float]) -> None:
    schedule = warmup_cosine(peak=1.0, total_steps=total, warmup_steps=warmup)
    torch.testing.assert_close(schedule, torch.tensor(expected, dtype=torch.float64))


def test_ema_tau_formula_at_start_middle_and_end() -> None:
    tau = ema_tau(0.99, total_steps=101)  # K = 100
    assert tau.shape == (101,)
    assert tau.dtype == torch.float64
    assert tau[0].item() == pytest.approx(0.99)
    assert tau[50].item() == pytest.approx(0.995)
    assert tau[100].item() == 1.0
    k = 17
    assert tau[k].item() == pytest.approx(1 - 0.01 * (math.cos(math.pi * k / 100) + 1) / 2)
    assert torch.all(tau[1:] >= tau[:-1])


def test_ema_tau_degenerate_cases() -> None:
    torch.testing.assert_close(ema_tau(0.996, 1), torch.tensor([0.996], dtype=torch.float64))
    assert torch.all(ema_tau(1.0, 10) == 1.0)
    assert ema_tau(0.0, 3).tolist() == pytest.approx([0.0, 0.5, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"total_steps": 0, "warmup_steps": 0}, "total_steps"),
        ({"total_steps": 10, "warmup_steps": 11}, "warmup_steps"),
        ({"total_steps": 10, "warmup_steps": -1}, "warmup_steps"),
        ({"total_steps": 10, "warmup_steps": 2, "peak": -1.0}, "peak"),
        ({"total_steps": 10, "warmup_steps": 2, "peak": math.nan}, "peak"),
        ({"total_steps": 10, "warmup_steps": 2, "final": 2.0}, "final"),
        ({"total_steps": 10, "warmup_steps": 2, "final": -0.1}, "final"),
    ],
)
def test_warmup_cosine_rejects_nonsense(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        warmup_cosine(**{"peak": 1.0, **kwargs})


@pytest.mark.parametrize(("tau_base", "total_steps"), [(1.5, 10), (-0.1, 10), (0.99, 0)])
def test_ema_tau_rejects_nonsense(tau_base: float, total_steps: int) -> None:
    name = "total_steps" if total_steps < 1 else "tau_base"
    with pytest.raises(ValueError, match=name):
        ema_tau(tau_base, total_steps)


def test_step_counts_must_be_ints() -> None:
    with pytest.raises(TypeError, match="total_steps"):
        ema_tau(0.99, 10.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="warmup_steps"):
        warmup_cosine(1.0, 10, True)


def test_steps_per_epoch_and_epochs_to_steps() -> None:
    assert steps_per_epoch(1_281_167, 4096) == 312  # ImageNet-1k at the paper's batch
    assert steps_per_epoch(1_281_167, 4096, drop_last=False) == 313
    assert epochs_to_steps(10, 312) == 3120
    assert epochs_to_steps(0.5, 312) == 156
    with pytest.raises(ValueError, match="global_batch"):
        steps_per_epoch(100, 256)
    with pytest.raises(ValueError, match="global_batch"):
        steps_per_epoch(100, 0)
    with pytest.raises(ValueError, match="epochs"):
        epochs_to_steps(-1, 312)


def test_schedules_compose_into_the_paper_recipe() -> None:
    per_epoch = steps_per_epoch(1_281_167, 4096)
    total = epochs_to_steps(300, per_epoch)
    lr = warmup_cosine(7.2, total, epochs_to_steps(10, per_epoch))
    tau = ema_tau(0.99, total)
    assert lr.shape == tau.shape == (93_600,)
    assert lr[3119].item() == pytest.approx(7.2)
    assert lr[-1].item() == 0.0
    assert tau[-1].item() == 1.0
