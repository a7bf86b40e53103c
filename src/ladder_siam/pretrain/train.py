"""``ladder-siam pretrain``: Ladder Siamese Network pretraining, single process or torchrun.

Run with ``python -m ladder_siam.pretrain`` or ``torchrun --nproc-per-node=8 -m
ladder_siam.pretrain`` (a Kubeflow PyTorchJob runs the latter in every pod). The loop:

1. loader workers decode, random-resized-crop and flip both views (uint8), or with
   ``--decode gpu`` only draw the crops, and the device decodes and crops the batch;
2. on the device, the photometric half of BYOL's augmentation runs batched (both steps in
   :mod:`ladder_siam.pretrain.views`);
3. the Ladder loss (all stages) is back-propagated, LARS steps, the EMA target follows;
4. every ``log_every`` steps: a log line, a ``train_log.jsonl`` record, Prometheus metrics;
   every ``checkpoint_every`` steps: an atomic checkpoint, resumed automatically on restart.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ladder_siam.data.labeled import has_labels
from ladder_siam.data.manifest import SplitManifest, load_split
from ladder_siam.data.shards import ShardDataset, make_loader
from ladder_siam.errors import UsageError
from ladder_siam.io import storage
from ladder_siam.nets import formats
from ladder_siam.nets.backbone_file import BackboneInfo
from ladder_siam.pretrain.config import PretrainConfig, add_arguments, config_from_args
from ladder_siam.pretrain.model import LadderOutput, LadderSiam
from ladder_siam.pretrain.monitor import OnlineMonitor, build_monitor
from ladder_siam.pretrain.reporting import IntervalReporter, interval_metrics, interval_record
from ladder_siam.pretrain.views import augmented_views, build_augment, build_dataset
from ladder_siam.runtime import distributed, resume, tracking
from ladder_siam.runtime.health import CollapseMonitor, FiniteCheck, NonFiniteLossError
from ladder_siam.runtime.loop import (
    IntervalMeans,
    autocast,
    convert_sync_bn,
    gradient_sync,
    set_lr,
    wrap_ddp,
)
from ladder_siam.runtime.metrics import TrainingMetrics
from ladder_siam.runtime.optim import LARS, param_groups, scaled_lr
from ladder_siam.runtime.progress import Progress
from ladder_siam.runtime.run_folder import RunFolder
from ladder_siam.runtime.schedules import ema_tau, warmup_cosine
from ladder_siam.runtime.train_log import TrainLog
from ladder_siam.runtime.trainer_status import TrainerStatus

logger = logging.getLogger(__name__)
LOOP = "pretraining"


@dataclass
class Trainer:
    """The state of a run that the loop functions share.

    Attributes:
        model: The Ladder model: what is saved, exported and EMA-updated.
        ddp_model: ``model`` as :func:`~ladder_siam.runtime.loop.wrap_ddp` returned it
            (``model`` itself in one process): where DDP's gradient sync is skipped.
        step_model: What runs the forward pass: ``ddp_model``, compiled with ``--compile``.
    """

    config: PretrainConfig
    env: distributed.DistributedEnv
    model: LadderSiam
    ddp_model: nn.Module
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


@dataclass
class Interval:
    """The logging interval in progress: each step's named values and its data wait."""

    means: IntervalMeans = field(default_factory=IntervalMeans)
    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0


def build_model(config: PretrainConfig, env: distributed.DistributedEnv) -> LadderSiam:
    """The Ladder Siamese model for ``config`` on this process's device.

    With ``sync_bn`` every BatchNorm layer, heads and target too, becomes a SyncBatchNorm
    over the ranks of ``sync_bn_scope`` (GPUs only, see
    :func:`~ladder_siam.runtime.loop.convert_sync_bn`).
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
        model = convert_sync_bn(model, env, config.sync_bn_scope)
    model = model.to(env.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(model: LadderSiam, config: PretrainConfig) -> LARS:
    """LARS over the online encoder and the predictors (the target is never optimised)."""
    online = nn.ModuleList([model.online, model.predictors, model.dense_predictors])
    return LARS(param_groups(online, config.weight_decay), lr=0.0, eta=config.lars_eta)


def accumulate_gradients(trainer: Trainer, batches: list[Any]) -> list[LadderOutput]:
    """Forward and backward of each micro-batch; DDP all-reduces once, after the last."""
    outputs = []
    for index, batch in enumerate(batches):
        view_a, view_b = augmented_views(
            trainer.augment, batch, trainer.config, trainer.env.device, trainer.step, index
        )
        with gradient_sync(trainer.ddp_model, sync=index == len(batches) - 1):
            with autocast(trainer.env.device, trainer.config.precision):
                output = trainer.step_model(view_a, view_b)
            (output.loss / len(batches)).backward()
        outputs.append(output)
    return outputs


def combine(outputs: list[LadderOutput]) -> LadderOutput:
    """A step's output: losses and spreads averaged over its micro-batches, features joined."""
    levels = list(outputs[0].per_level)

    def mean(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([value.detach() for value in values]).mean()

    return LadderOutput(
        loss=mean([o.loss for o in outputs]),
        per_level={level: mean([o.per_level[level] for o in outputs]) for level in levels},
        output_std={level: mean([o.output_std[level] for o in outputs]) for level in levels},
        features={s: torch.cat([o.features[s] for o in outputs]) for s in outputs[0].features},
        projections={s: torch.cat([o.projections[s] for o in outputs]) for s in levels},
    )


def training_step(trainer: Trainer, micro_batches: list[Any]) -> LadderOutput:
    """One optimizer step over ``accumulation`` micro-batches; returns their combined output.

    A micro-batch is a loader batch: two views or a ``JpegBatch``, paired with the labels
    when the online monitor runs, which then scores and trains its probes on the step.
    """
    labels: tuple[torch.Tensor, ...] = ()
    if trainer.monitor is not None:
        micro_batches, labels = zip(*micro_batches, strict=True)  # type: ignore[assignment]
    set_lr(trainer.optimizer, float(trainer.lr[trainer.step]))
    output = combine(accumulate_gradients(trainer, list(micro_batches)))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.update_target(float(trainer.tau[trainer.step]))
    trainer.step += 1
    if trainer.monitor is not None:
        labels_on_device = torch.cat(labels).to(trainer.env.device, non_blocking=True)
        trainer.monitor.update(trainer.step, output.features, output.projections, labels_on_device)
    return output


def train_one_epoch(
    trainer: Trainer,
    loader: torch.utils.data.DataLoader,
    epoch: int,
    progress: Progress,
    finite: FiniteCheck,
    reporter: IntervalReporter,
) -> None:
    """Runs the steps of one epoch (from the resumed position) until it or the run ends."""
    config, env = trainer.config, trainer.env
    batches = iter(loader)
    interval = Interval()
    # The pod's share of the batch: the counter summed over pods is the images trained.
    pod_images = config.batch_size * env.local_world_size // env.world_size
    while trainer.step < trainer.total_steps:
        wait_start = time.perf_counter()
        micro_batches = list(itertools.islice(batches, config.accumulation))
        if len(micro_batches) < config.accumulation:
            return
        waited = time.perf_counter() - wait_start
        output = training_step(trainer, micro_batches)
        finite.submit(trainer.step, {"total": output.loss, **output.per_level})
        interval.means.add(interval_metrics(output))
        interval.data_wait += waited
        trainer.metrics.record_step(pod_images, time.perf_counter() - wait_start, waited)
        progress.update(1)
        if trainer.step % config.log_every == 0 or trainer.step == trainer.total_steps:
            finite.check()
            report_interval(trainer, epoch, interval, reporter, progress)
            interval = Interval()
        if trainer.step % config.checkpoint_every == 0 or trainer.step == trainer.total_steps:
            finite.check()
            save_checkpoint(trainer)


def report_interval(
    trainer: Trainer,
    epoch: int,
    interval: Interval,
    reporter: IntervalReporter,
    progress: Progress,
) -> None:
    """Sends the interval's means and the online monitor's reading to the reporter."""
    elapsed = time.perf_counter() - interval.start
    # The loader yields whole batches only, so every step is one global batch.
    images = len(interval.means) * trainer.config.batch_size
    last = trainer.step - 1
    reading = trainer.monitor.reading() if trainer.monitor is not None else None
    record = interval_record(
        trainer.step, epoch, float(trainer.lr[last]), float(trainer.tau[last]),
        interval.means.pop(), images / elapsed, interval.data_wait / elapsed, reading,
    )  # fmt: skip
    reporter.report(record, trainer.model.supervised, reading, progress)


def save_checkpoint(trainer: Trainer) -> None:
    """Rank 0 writes the run's state at the current step."""
    if trainer.env.is_main:
        parts: dict[str, resume.Stateful] = {"model": trainer.model, "optimizer": trainer.optimizer}
        if trainer.monitor is not None:
            parts["monitor"] = trainer.monitor
        resume.save(trainer.config, trainer.step, parts)


def export_backbone(trainer: Trainer) -> str:
    """Writes ``backbone.pt``, ``backbone.safetensors`` and ``backbone.json``.

    The first is a torchvision state_dict, the second the same tensors without pickle, the
    third the backbone's arch, method, seed and step.
    """
    config = trainer.config
    run = RunFolder(config.out)
    uri = run.backbone
    if trainer.env.is_main:
        state = trainer.model.backbone_state_dict()
        with storage.atomic_write(uri) as stream:
            torch.save(state, stream)
        info = BackboneInfo(arch=config.arch, small_input=config.small_input)
        storage.write_bytes(run.backbone_safetensors, formats.safetensors_bytes(state, info))
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
        UsageError: A bad setting or input, detected before any work starts.
        NonFiniteLossError: A loss became NaN/inf; the message names the level, the step and
            the value.
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
        raise UsageError(
            f"{config.shards}: fewer samples than one global batch of {config.batch_size}"
        )
    trainer = build_trainer(config, env, manifest, steps_per_epoch)
    logger.info(
        "pretraining %s %s (levels %s, weights %s) on %d x %s: %d steps of %d images, %d per epoch",
        config.method, config.arch, config.levels, config.stage_weights(), env.world_size,
        env.device.type, trainer.total_steps, config.batch_size, steps_per_epoch,
    )  # fmt: skip
    finite = FiniteCheck(LOOP, total="total")
    collapse = CollapseMonitor(config.collapse_threshold, config.collapse_patience)
    reporter = IntervalReporter(
        trainer.metrics, trainer.train_log, collapse, trainer.total_steps, env.is_main,
        status=TrainerStatus.from_env() if env.is_main else None,
        tracker=tracking.start_run(f"pretrain {config.method} s{config.seed}", asdict(config))
        if env.is_main
        else None,
    )  # fmt: skip
    completed = False
    try:
        train(trainer, dataset, finite, reporter)
        completed = True
    finally:
        reporter.finish(completed)
    return export_backbone(trainer)


def train(
    trainer: Trainer, dataset: ShardDataset, finite: FiniteCheck, reporter: IntervalReporter
) -> None:
    """Runs the epochs from the resumed step to the end, one loader per epoch."""
    config, env, steps_per_epoch = trainer.config, trainer.env, trainer.steps_per_epoch
    with Progress(
        trainer.total_steps, "pretrain", unit="step", logger=logger, enabled=env.is_main
    ) as progress:
        progress.update(trainer.step)
        while trainer.step < trainer.total_steps:
            epoch = trainer.step // steps_per_epoch
            dataset.set_epoch(epoch, (trainer.step % steps_per_epoch) * config.accumulation)
            loader = make_loader(dataset, config.workers, pin_memory=env.device.type == "cuda")
            try:
                train_one_epoch(trainer, loader, epoch, progress, finite, reporter)
                finite.check()
            except NonFiniteLossError as error:
                for level in error.values:
                    trainer.metrics.record_nonfinite(level)
                raise


def build_trainer(
    config: PretrainConfig,
    env: distributed.DistributedEnv,
    manifest: SplitManifest,
    steps_per_epoch: int,
) -> Trainer:
    """The model, optimizer, schedules and monitor of a run, resumed from its newest checkpoint.

    Raises:
        ResumeError: A checkpoint under ``config.out`` belongs to other settings.
    """
    schedule_steps = config.epochs * steps_per_epoch
    warmup = min(round(config.warmup_epochs * steps_per_epoch), schedule_steps)
    model = build_model(config, env)
    ddp_model = wrap_ddp(model, env)
    step_model = torch.compile(ddp_model) if config.compile else ddp_model
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
    return Trainer(
        config=config, env=env, model=model, ddp_model=ddp_model, step_model=step_model,
        optimizer=optimizer,
        lr=warmup_cosine(scaled_lr(config.base_lr, config.batch_size), schedule_steps, warmup),
        tau=ema_tau(config.tau_base, schedule_steps),
        augment=build_augment(config, env.device), steps_per_epoch=steps_per_epoch,
        total_steps=min(schedule_steps, config.max_steps or schedule_steps), metrics=metrics,
        train_log=TrainLog(config.out, resumed.step if resumed else None, env.is_main),
        step=resumed.step if resumed else 0, monitor=monitor,
    )  # fmt: skip


def get_args_parser() -> argparse.ArgumentParser:
    """Options of ``ladder-siam pretrain`` (every field of :class:`PretrainConfig`)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> None:
    """Runs ``pretrain`` from parsed arguments."""
    pretrain(config_from_args(args))
