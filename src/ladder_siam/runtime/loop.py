"""The rules every training loop follows the same way, as small functions.

Pretraining, the standard linear probe (and the fast probe's heads) and the detection and
segmentation finetunes each wrap their model in DDP under torchrun, synchronise BatchNorm on
GPUs, autocast to bf16 when asked, limit torch's CPU threads when asked, and average named
values over a logging interval into ``train_log.jsonl`` (:class:`IntervalLog`). Each rule is
written once, here; the loops call it. With
:class:`~ladder_siam.runtime.health.FiniteCheck` (a NaN stops the loop within one interval)
this is all a loop shares; ``tests/test_loops.py`` keeps it that way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ladder_siam.runtime import distributed
from ladder_siam.runtime.distributed import DistributedEnv
from ladder_siam.runtime.progress import Progress
from ladder_siam.runtime.train_log import TrainLog

logger = logging.getLogger(__name__)


def wrap_ddp(model: nn.Module, env: DistributedEnv) -> nn.Module:
    """``model`` in DistributedDataParallel under torchrun; ``model`` itself in one process.

    Gradients are all-reduced in ``backward``; the checkpoint keeps saving ``model`` (the
    unwrapped one), so its keys do not depend on the world size.
    """
    if env.world_size == 1:
        return model
    # On CPU (gloo) DDP takes no device ids: the module's parameters say where it runs.
    return DistributedDataParallel(
        model, device_ids=[env.device] if env.device.type == "cuda" else None
    )


def broadcast_buffers(model: nn.Module, env: DistributedEnv) -> None:
    """Gives every rank rank 0's buffers (BatchNorm's running statistics) before evaluating.

    DDP broadcasts rank 0's buffers at the start of each forward, so after the last step
    every rank holds the statistics its own last batch left. Without SyncBN (on CPU, or
    ``sync_bn`` off) they differ, and ranks scoring shares of a split would score different
    models; rank 0's is the one the checkpoint holds.
    """
    if env.world_size == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def gradient_sync(model: nn.Module, sync: bool) -> AbstractContextManager[object]:
    """DDP's ``no_sync`` unless ``sync``: for every micro-batch of a step but the last.

    Accumulated gradients are all-reduced once per optimizer step instead of once per
    micro-batch. ``model`` is what :func:`wrap_ddp` returned; a single process has nothing
    to skip.
    """
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def convert_sync_bn(model: nn.Module, env: DistributedEnv, scope: str = "all") -> nn.Module:
    """Every BatchNorm of ``model`` as SyncBatchNorm across the ranks of ``scope``, on GPUs.

    PyTorch's SyncBatchNorm refuses CPU tensors, so CPU (gloo) runs keep per-process
    statistics, with a warning; a single process has no other statistics to share. Every
    rank must call this: the ``node`` scope creates its process groups collectively.

    Args:
        model: The model, before :func:`wrap_ddp`.
        env: This process's ranks and device.
        scope: ``all`` ranks or the ranks of this ``node`` (see
            :func:`~ladder_siam.runtime.distributed.batchnorm_group`).
    """
    if env.world_size == 1:
        return model
    if env.device.type != "cuda":
        if env.is_main:
            logger.warning("--sync-bn has no effect on %s: BatchNorm stays per process", env.device)
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, distributed.batchnorm_group(scope))


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The forward pass's autocast context: bf16 for ``precision="bf16"``, off for fp32."""
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """Sets torch's intra-op threads to ``count`` inside the block (None: torch's choice).

    The previous count comes back afterwards, so a loop called in-process (tests, the local
    pipeline) leaves its caller's setting alone.
    """
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets the learning rate of every parameter group (the schedule's value of this step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class IntervalMeans:
    """Named scalars of each step, kept on the device and averaged once per logging interval.

    Each step's values are stacked into one tensor in the order of their names; reading the
    interval's means is one host transfer, and the names are zipped back onto them.
    """

    def __init__(self) -> None:
        self._names: list[str] = []
        self._rows: list[torch.Tensor] = []

    def __len__(self) -> int:
        """Steps added since the last :meth:`pop`."""
        return len(self._rows)

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
        """Adds one step's values; every step of an interval names the same values.

        Raises:
            ValueError: The names differ from the interval's first step.
        """
        names = list(values)
        if self._rows and names != self._names:
            raise ValueError(f"interval values {names} differ from {self._names}")
        self._names = names
        self._rows.append(torch.stack([value.detach().float() for value in values.values()]))

    def pop(self) -> dict[str, float]:
        """The interval's mean of each value, by name; the next interval starts empty."""
        if not self._rows:
            return {}
        means = torch.stack(self._rows).mean(dim=0).tolist()
        self._rows = []
        return dict(zip(self._names, means, strict=True))


class IntervalLog:
    """A loop's logging intervals: named means to ``train_log.jsonl`` and a log line.

    Each step adds its named values (losses, on the device) and its images; every
    ``log_every`` steps :meth:`write` averages them into one record, ``{"step", "lr",
    <names>, "images_per_second", "time"}``, which goes to the run's train log and, without a
    progress bar (pod logs), to one log line. Pretraining reports more per interval
    (Prometheus, the collapse check; ``pretrain/reporting.py``) but averages the same way.

    Args:
        loop: The loop's name, first on each log line.
        total_steps: Steps of the whole run, for the log line.
        train_log: The run's ``train_log.jsonl`` (disabled on ranks other than 0), if any.
        report: Whether this process logs (rank 0).
    """

    def __init__(
        self, loop: str, total_steps: int, train_log: TrainLog | None, report: bool = True
    ) -> None:
        self.loop = loop
        self.total_steps = total_steps
        self.train_log = train_log
        self.report = report
        self.means = IntervalMeans()
        self.images = 0
        self.start = time.perf_counter()

    def add(self, values: Mapping[str, torch.Tensor], images: int) -> None:
        """Adds one step's values and the images it trained on (over all ranks)."""
        self.means.add(values)
        self.images += images

    def write(self, step: int, lr: float, progress: Progress) -> dict[str, float]:
        """Closes the interval at ``step`` and returns its record."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        record = {
            "step": step,
            "lr": lr,
            **self.means.pop(),
            "images_per_second": self.images / elapsed,
            "time": time.time(),
        }
        self.images, self.start = 0, time.perf_counter()
        if self.train_log is not None:
            self.train_log.append(record)
        if self.report and not progress.has_bar:
            named = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss"))
            logger.info(
                "%s step %d/%d %s lr %.4g %.1f img/s",
                self.loop, step, self.total_steps, named, lr, record["images_per_second"],
            )  # fmt: skip
        return record
