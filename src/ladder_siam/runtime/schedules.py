"""Per-iteration schedules for the learning rate and the EMA target rate.

Each schedule is computed once, before training, as a float64 CPU tensor with one entry per
optimiser step, so the training loop only indexes it (``float(schedule[step])``): no Python
maths per step and, the tensor being on the CPU, no host-device synchronisation.

Both follow BYOL (Grill et al. 2020, section 3.3), which the Ladder Siamese Network keeps: a
linear warm-up (10 epochs) followed by a cosine decay of the learning rate to 0, and a target
rate ``tau`` raised from ``tau_base`` to 1 with a cosine.
"""

from __future__ import annotations

import math

import torch

from ladder_siam.errors import UsageError


def _check_count(name: str, value: int, minimum: int) -> None:
    """Raises unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def steps_per_epoch(num_samples: int, global_batch: int, drop_last: bool = True) -> int:
    """Optimiser steps in one pass over ``num_samples`` with batches of ``global_batch``.

    Args:
        num_samples: Training samples in the dataset.
        global_batch: Batch size summed over all processes.
        drop_last: Whether an incomplete last batch is dropped (as BYOL does) or stepped on.

    Returns:
        The number of steps per epoch.

    Raises:
        ValueError: If there is not one full batch when ``drop_last`` is set, or a count is
            below 1.
    """
    _check_count("num_samples", num_samples, 1)
    _check_count("global_batch", global_batch, 1)
    steps = num_samples // global_batch if drop_last else -(-num_samples // global_batch)
    if steps < 1:
        raise UsageError(
            f"num_samples ({num_samples}) is smaller than global_batch ({global_batch}) "
            "and drop_last is set: an epoch would have no steps"
        )
    return steps


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """Converts a duration in epochs (e.g. 10 warm-up epochs) to whole steps, rounding.

    Args:
        epochs: Duration in epochs; fractions are allowed.
        steps_per_epoch: Steps in one epoch, e.g. from :func:`steps_per_epoch`.

    Returns:
        ``round(epochs * steps_per_epoch)``.

    Raises:
        ValueError: If ``epochs`` is negative or not finite, or ``steps_per_epoch`` below 1.
    """
    if not math.isfinite(epochs) or epochs < 0:
        raise ValueError(f"epochs must be finite and >= 0, got {epochs}")
    _check_count("steps_per_epoch", steps_per_epoch, 1)
    return round(epochs * steps_per_epoch)


def warmup_cosine(
    peak: float, total_steps: int, warmup_steps: int, final: float = 0.0
) -> torch.Tensor:
    """Linear warm-up to ``peak``, then a cosine decay to ``final``, one value per step.

    Warm-up step ``k`` (``0 <= k < warmup_steps``) has ``peak * (k + 1) / warmup_steps``, so the
    first step already moves (BYOL's ``peak * k / warmup_steps`` spends it at 0) and the last
    warm-up step reaches ``peak``. The remaining ``n = total_steps - warmup_steps`` steps follow
    ``final + (peak - final) * (1 + cos(pi * j / (n - 1))) / 2`` for ``j = 0 .. n - 1``: the
    first is ``peak`` and the last exactly ``final`` (a single remaining step stays at
    ``peak``).

    Args:
        peak: Value at the end of the warm-up, e.g. :func:`ladder_siam.runtime.optim.scaled_lr`.
        total_steps: Length of the schedule (all training steps).
        warmup_steps: Steps of linear warm-up, at most ``total_steps``.
        final: Value at the last step, between 0 and ``peak``.

    Returns:
        A float64 CPU tensor of shape ``(total_steps,)``.

    Raises:
        ValueError: If a value is out of range; the message names the argument.
    """
    _check_count("total_steps", total_steps, 1)
    _check_count("warmup_steps", warmup_steps, 0)
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})"
        )
    if not math.isfinite(peak) or peak < 0:
        raise ValueError(f"peak must be finite and >= 0, got {peak}")
    if not math.isfinite(final) or not 0 <= final <= peak:
        raise ValueError(f"final must be between 0 and peak ({peak}), got {final}")
    warmup = peak * torch.arange(1, warmup_steps + 1, dtype=torch.float64) / max(warmup_steps, 1)
    decay_steps = total_steps - warmup_steps
    progress = torch.arange(decay_steps, dtype=torch.float64) / max(decay_steps - 1, 1)
    decay = final + (peak - final) * (1 + torch.cos(math.pi * progress)) / 2
    return torch.cat([warmup, decay])


def ema_tau(tau_base: float, total_steps: int) -> torch.Tensor:
    """BYOL's target rate: ``tau_k = 1 - (1 - tau_base) * (cos(pi * k / K) + 1) / 2``.

    ``K = total_steps - 1`` is the last step, so ``tau_0 = tau_base``, ``tau_{K/2}`` is halfway
    to 1 and ``tau_K = 1`` (Grill et al. 2020, section 3.3). BYOL starts from 0.996; the Ladder
    Siamese Network's recipe starts from 0.99 at batch 4096.

    Args:
        tau_base: Rate at the first step, in ``[0, 1]``.
        total_steps: Length of the schedule (all training steps).

    Returns:
        A float64 CPU tensor of shape ``(total_steps,)``; a one-step schedule is ``[tau_base]``.

    Raises:
        ValueError: If ``tau_base`` is outside ``[0, 1]`` or ``total_steps`` below 1.
    """
    _check_count("total_steps", total_steps, 1)
    if not 0 <= tau_base <= 1:
        raise ValueError(f"tau_base must be in [0, 1], got {tau_base}")
    progress = torch.arange(total_steps, dtype=torch.float64) / max(total_steps - 1, 1)
    return 1 - (1 - tau_base) * (torch.cos(math.pi * progress) + 1) / 2
