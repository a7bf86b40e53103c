"""Timing a training step on a device, and the machine a record was measured on.

Shared by the step benchmarks (``bench_step.py``, ``bench_eval_step.py``) so that they time
the same way: untimed warm-up steps first, the device synchronised before every clock reading,
peak memory over the timed steps only.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision


def sync(device: torch.device) -> None:
    """Waits for the device: CUDA kernels run asynchronously, so the clock would stop early."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], None], steps: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Runs ``warmup`` untimed then ``steps`` timed calls of ``step``.

    Returns:
        ``warmup_seconds``, ``seconds_per_iteration`` and ``peak_memory_gib`` (0 on a CPU),
        the peak over the timed steps.
    """
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {
        "warmup_seconds": warmup_seconds,
        "seconds_per_iteration": seconds / steps,
        "peak_memory_gib": peak / 2**30,
    }


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def machine(device: torch.device) -> dict[str, Any]:
    """The device, the host and the versions, stored with every record."""
    return {
        "device": device_name(device), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }  # fmt: skip
