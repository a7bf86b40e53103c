"""``ladder-siam pretrain``: Ladder Siamese Network pretraining, single process or torchrun.

Run with ``python -m ladder_siam.pretrain`` or ``torchrun --nproc-per-node=8 -m
ladder_siam.pretrain`` (a Kubeflow PyTorchJob runs the latter in every pod). The loop:

1. loader workers decode, random-resized-crop and flip both views (uint8), or with
   ``--decode gpu`` only draw the crops, and the device decodes and crops the batch;
2. on the device, the photometric half of BYOL's augmentation runs batched;
3. the Ladder loss (all stages) is back-propagated, LARS steps, the EMA target follows;
4. every ``log_every`` steps: a log line, a ``train_log.jsonl`` record, Prometheus metrics;
   every ``checkpoint_every`` steps: an atomic checkpoint, resumed automatically on restart.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import default_collate

from ladder_siam.data.crops import TwoViewCrop
from ladder_siam.data.gpu_decode import JpegBatch, JpegTwoViews, collate_jpegs, decode_views
from ladder_siam.data.labeled import CollateWithLabels, WithLabel, has_labels
from ladder_siam.data.manifest import SplitManifest, load_split
from ladder_siam.data.shards import ShardDataset, Transform, make_loader
from ladder_siam.io import storage
from ladder_siam.pretrain.augmentation import TwoViewPhotometric
from ladder_siam.pretrain.config import PretrainConfig, add_arguments, config_from_args
from ladder_siam.pretrain.model import LadderOutput, LadderSiam
from ladder_siam.pretrain.monitor import OnlineMonitor, build_monitor
from ladder_siam.pretrain.reporting import IntervalReporter, interval_record
from ladder_siam.runtime import distributed, resume
from ladder_siam.runtime.health import CollapseMonitor, FiniteCheck, NonFiniteLossError
from ladder_siam.runtime.metrics import TrainingMetrics
from ladder_siam.runtime.optim import LARS, param_groups, scaled_lr
from ladder_siam.runtime.progress import Progress
from ladder_siam.runtime.run_folder import RunFolder
from ladder_siam.runtime.schedules import ema_tau, warmup_cosine
from ladder_siam.runtime.train_log import TrainLog

logger = logging.getLogger(__name__)


@dataclass
class Trainer:
    """The state of a run that the loop functions share."""

    config: PretrainConfig
    env: distributed.DistributedEnv
    model: LadderSiam
    step_model: nn.Module
    optimizer: LARS
    lr: torch.Tensor
    tau: torch.Tensor
    augment: nn.Module
    steps_per_epoch: int
    total_steps: int
    metrics: TrainingMetrics
    train_log: TrainLog
    step: int = 0
    monitor: OnlineMonitor | None = None


def build_model(
    config: PretrainConfig,
    device: torch.device,
    batchnorm_group: torch.distributed.ProcessGroup | None = None,
) -> LadderSiam:
    """The Ladder Siamese model for ``config`` on ``device``.

    With ``sync_bn`` every BatchNorm layer becomes a SyncBatchNorm over ``batchnorm_group``
    (``None``: all ranks).
    """
    model = LadderSiam(
        config.arch,
        config.levels,
        config.stage_weights(),
        small_input=config.small_input,
        hidden_dim=config.hidden_dim,
        projection_dim=config.projection_dim,
        dense_dim=config.dense_dim,
    )
    if config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, batchnorm_group)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(model: LadderSiam, config: PretrainConfig) -> LARS:
    """LARS over the online network and its heads (the target is never optimised)."""
    online = nn.ModuleList([*model.online_modules(), model.predictors, model.dense_predictors])
    return LARS(param_groups(online, config.weight_decay), lr=0.0, eta=config.lars_eta)


def build_dataset(
    config: PretrainConfig,
    rank: int,
    world_size: int,
    labels: bool = False,
    manifest: SplitManifest | None = None,
) -> ShardDataset:
    """This rank's training batches of two uint8 views per image.

    With ``decode="gpu"`` a batch is a :class:`~ladder_siam.data.gpu_decode.JpegBatch` instead:
    the images' JPEG bytes and crops, for :func:`views_on_device` to decode. With ``labels``
    a batch is ``(batch, labels)`` (for the online monitor). ``manifest`` is the train split
    if already read.
    """
    manifest = manifest or load_split(config.shards, "train")
    per_rank = config.batch_size // (world_size * config.accumulation)
    crop = TwoViewCrop(config.image_size)
    transform: Transform = crop.from_jpeg
    collate: Callable[[list[Any]], Any] = default_collate
    if config.decode == "gpu":
        transform, collate = JpegTwoViews(crop), collate_jpegs
    if labels:
        transform, collate = WithLabel(transform), CollateWithLabels(collate)
    return ShardDataset(
        manifest, per_rank, transform, rank, world_size, seed=config.seed,
        buffer_size=config.buffer_size, collate=collate, decode=False,
    )  # fmt: skip


def views_on_device(
    batch: tuple[torch.Tensor, torch.Tensor] | JpegBatch, size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch as two uint8 ``[B, 3, size, size]`` views on ``device``."""
    if isinstance(batch, JpegBatch):
        return decode_views(batch, size, device)
    view_a, view_b = batch
    return view_a.to(device, non_blocking=True), view_b.to(device, non_blocking=True)


def build_augment(config: PretrainConfig, device: torch.device) -> nn.Module:
    """The photometric half of BYOL's augmentation, on the training device."""
    augment = TwoViewPhotometric().to(device)
    return torch.compile(augment, dynamic=False) if config.compile else augment


def training_step(trainer: Trainer, micro_batches: list[Any]) -> LadderOutput:
    """One optimizer step over ``accumulation`` micro-batches; returns their mean output.

    A micro-batch is a loader batch: two views or a ``JpegBatch``, paired with the labels
    when the online monitor runs, which then scores and trains its probes on the step.
    """
    config, device, step = trainer.config, trainer.env.device, trainer.step
    labels: tuple[torch.Tensor, ...] = ()
    if trainer.monitor is not None:
        micro_batches, labels = zip(*micro_batches, strict=True)  # type: ignore[assignment]
    watched: list[LadderOutput] = []
    for group in trainer.optimizer.param_groups:
        group["lr"] = float(trainer.lr[step])
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=config.precision == "bf16")
    per_level: dict[str, torch.Tensor] = {}
    spread: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=device)
    for index, batch in enumerate(micro_batches):
        # Augmentation draws from torch's RNG; seeding per step makes a resumed run exact.
        torch.manual_seed(
            int(np.random.SeedSequence([config.seed, step, index]).generate_state(1)[0])
        )
        with torch.no_grad():
            view_a, view_b = trainer.augment(*views_on_device(batch, config.image_size, device))
        if config.channels_last:
            view_a = view_a.contiguous(memory_format=torch.channels_last)
            view_b = view_b.contiguous(memory_format=torch.channels_last)
        last = index == len(micro_batches) - 1
        no_sync = getattr(trainer.step_model, "no_sync", None)
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with autocast:
                output = trainer.step_model(view_a, view_b)
            (output.loss / len(micro_batches)).backward()
        total += output.loss.detach() / len(micro_batches)
        watched.append(output)
        for level, loss in output.per_level.items():
            per_level[level] = per_level.get(level, 0) + loss.detach() / len(micro_batches)
            spread[level] = spread.get(level, 0) + output.output_std[level] / len(micro_batches)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.update_target(float(trainer.tau[step]))
    trainer.step += 1
    if trainer.monitor is not None:
        trainer.monitor.update(
            trainer.step,
            {s: torch.cat([o.features[s] for o in watched]) for s in watched[0].features},
            {s: torch.cat([o.projections[s] for o in watched]) for s in watched[0].projections},
            torch.cat(labels).to(device, non_blocking=True),
        )
    return LadderOutput(total, per_level, spread)


def train_one_epoch(
    trainer: Trainer,
    loader: torch.utils.data.DataLoader,
    epoch: int,
    progress: Progress,
    finite: FiniteCheck,
    reporter: IntervalReporter,
) -> None:
    """Runs the steps of one epoch (from the resumed position) until it or the run ends."""
    config = trainer.config
    batches = iter(loader)
    interval: list[torch.Tensor] = []
    interval_start, data_wait, images = time.perf_counter(), 0.0, 0
    while trainer.step < trainer.total_steps:
        wait_start = time.perf_counter()
        micro_batches = list(itertools.islice(batches, config.accumulation))
        if len(micro_batches) < config.accumulation:
            return
        waited = time.perf_counter() - wait_start
        step_start = time.perf_counter()
        output = training_step(trainer, micro_batches)
        finite.submit(trainer.step, {"total": output.loss, **output.per_level})
        levels = list(output.per_level)
        interval.append(
            torch.stack([output.loss, *output.per_level.values(), *output.output_std.values()])
        )
        # The loader yields whole batches only, so every step is one global batch.
        images += config.batch_size
        data_wait += waited
        # The pod's share of the batch: the counter summed over pods is the images trained.
        pod_images = config.batch_size * trainer.env.local_world_size // trainer.env.world_size
        trainer.metrics.record_step(pod_images, time.perf_counter() - step_start + waited, waited)
        progress.update(1)
        if trainer.step % config.log_every == 0 or trainer.step == trainer.total_steps:
            finite.check()
            elapsed = time.perf_counter() - interval_start
            means = torch.stack(interval).mean(dim=0).tolist()
            last = trainer.step - 1
            reading = trainer.monitor.reading() if trainer.monitor is not None else None
            record = interval_record(
                trainer.step, epoch, float(trainer.lr[last]), float(trainer.tau[last]), levels,
                means, images / elapsed, data_wait / elapsed, reading,
            )  # fmt: skip
            reporter.report(record, levels, reading, progress)
            interval, interval_start, data_wait, images = [], time.perf_counter(), 0.0, 0
        if trainer.step % config.checkpoint_every == 0 or trainer.step == trainer.total_steps:
            finite.check()
            save_checkpoint(trainer)


def save_checkpoint(trainer: Trainer) -> None:
    """Rank 0 writes the run's state at the current step."""
    if trainer.env.is_main:
        parts: dict[str, resume.Stateful] = {"model": trainer.model, "optimizer": trainer.optimizer}
        if trainer.monitor is not None:
            parts["monitor"] = trainer.monitor
        resume.save(trainer.config, trainer.step, parts)


def export_backbone(trainer: Trainer) -> str:
    """Writes ``backbone.pt`` (torchvision state_dict) and ``backbone.json`` (its arch)."""
    config = trainer.config
    run = RunFolder(config.out)
    uri = run.backbone
    if trainer.env.is_main:
        with storage.atomic_write(uri) as stream:
            torch.save(trainer.model.backbone_state_dict(), stream)
        description = {
            "arch": config.arch,
            "small_input": config.small_input,
            "method": config.method,
            "levels": config.levels,
            "seed": config.seed,
            "step": trainer.step,
        }
        storage.write_text(run.backbone_info, json.dumps(description, indent=2) + "\n")
        logger.info("backbone exported to %s", uri)
    return uri


def pretrain(config: PretrainConfig) -> str:
    """Runs (or resumes) a pretraining run; returns the URI of the exported backbone.

    Raises:
        ValueError: A bad setting, detected before any work starts.
        NonFiniteLossError: A loss became NaN/inf; the message names the level and step.
    """
    env = distributed.setup()
    try:
        config.validate(env.world_size)
        return _run(config, env)
    finally:
        distributed.cleanup()


def _run(config: PretrainConfig, env: distributed.DistributedEnv) -> str:
    torch.manual_seed(config.seed)
    manifest = load_split(config.shards, "train")
    labels = config.online_monitor and has_labels(manifest)
    dataset = build_dataset(config, env.rank, env.world_size, labels, manifest)
    steps_per_epoch = dataset.batches_per_epoch // config.accumulation
    if steps_per_epoch == 0:
        raise ValueError(
            f"{config.shards}: fewer samples than one global batch of {config.batch_size}"
        )
    schedule_steps = config.epochs * steps_per_epoch
    total_steps = min(schedule_steps, config.max_steps or schedule_steps)
    warmup = min(round(config.warmup_epochs * steps_per_epoch), schedule_steps)

    # PyTorch's SyncBatchNorm refuses CPU tensors: CPU runs keep per-process statistics, as
    # the evaluations do.
    sync_bn = config.sync_bn and env.device.type == "cuda"
    if config.sync_bn and not sync_bn and env.is_main:
        logger.warning("--sync-bn has no effect on %s: BatchNorm stays per process", env.device)
    group = distributed.batchnorm_group(config.sync_bn_scope) if sync_bn else None
    model = build_model(dataclasses.replace(config, sync_bn=sync_bn), env.device, group)
    step_model: nn.Module = model
    if env.world_size > 1:
        step_model = DistributedDataParallel(
            model, device_ids=[env.device] if env.device.type == "cuda" else None
        )
    if config.compile:
        step_model = torch.compile(step_model)
    optimizer = build_optimizer(model, config)
    monitor = build_monitor(config, model, manifest, env)

    resumed = resume.resume(config.out, config, map_location=env.device)
    if resumed is not None:
        resume.restore(resumed, {"model": model, "optimizer": optimizer})
        if monitor is not None and "monitor" in resumed.state:
            monitor.load_state_dict(resumed.state["monitor"])
        elif monitor is not None and env.is_main:
            logger.info("the checkpoint has no online monitor state: its probes start afresh")
    metrics = TrainingMetrics(method=config.method, arch=config.arch)
    if env.is_local_main and config.metrics_port:
        metrics.serve(config.metrics_port)
    trainer = Trainer(
        config=config, env=env, model=model, step_model=step_model, optimizer=optimizer,
        lr=warmup_cosine(scaled_lr(config.base_lr, config.batch_size), schedule_steps, warmup),
        tau=ema_tau(config.tau_base, schedule_steps),
        augment=build_augment(config, env.device),
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, metrics=metrics,
        train_log=TrainLog(config.out, resumed.step if resumed else None, env.is_main),
        step=resumed.step if resumed else 0, monitor=monitor,
    )  # fmt: skip
    logger.info(
        "pretraining %s %s (levels %s, weights %s) on %d x %s: %d steps of %d images, %d per epoch",
        config.method, config.arch, config.levels, config.stage_weights(), env.world_size,
        env.device.type, total_steps, config.batch_size, steps_per_epoch,
    )  # fmt: skip
    finite = FiniteCheck()
    collapse = CollapseMonitor(config.collapse_threshold, config.collapse_patience)
    reporter = IntervalReporter(metrics, trainer.train_log, collapse, total_steps, env.is_main)
    loader_workers = config.workers
    with Progress(
        total_steps, "pretrain", unit="step", logger=logger, enabled=env.is_main
    ) as progress:
        progress.update(trainer.step)
        while trainer.step < total_steps:
            epoch = trainer.step // steps_per_epoch
            dataset.set_epoch(epoch, (trainer.step % steps_per_epoch) * config.accumulation)
            loader = make_loader(dataset, loader_workers, pin_memory=env.device.type == "cuda")
            try:
                train_one_epoch(trainer, loader, epoch, progress, finite, reporter)
                finite.check()
            except NonFiniteLossError as error:
                for level in error.levels:
                    metrics.record_nonfinite(level)
                raise
    return export_backbone(trainer)


def get_args_parser() -> argparse.ArgumentParser:
    """Options of ``ladder-siam pretrain`` (every field of :class:`PretrainConfig`)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> None:
    """Runs ``pretrain`` from parsed arguments."""
    pretrain(config_from_args(args))
