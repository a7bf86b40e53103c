"""The standard linear-evaluation protocol: classifiers trained on augmented views.

This is the protocol behind published ImageNet linear accuracies and the paper's Table 1
(section 4.1, run with mmselfsup): the backbone is frozen (eval-mode BatchNorm), every training
step draws a random resized crop (8-100 % of the area) with a horizontal flip, the linear
classifier on the pooled res5 features is trained with SGD and a cosine schedule for 100
epochs, and it is evaluated on centre crops. Because the backbone runs on every step, the run
is long; it checkpoints like pretraining (``OUT/checkpoints/``, atomic, newest resumed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ladder_siam.data.manifest import SplitManifest
from ladder_siam.data.shards import ShardDataset, make_loader
from ladder_siam.evals.probe.config import ProbeConfig
from ladder_siam.evals.probe.features import (
    EvalTransform,
    PooledStages,
    RandomCropFlip,
    extract_features,
    to_model_input,
)
from ladder_siam.evals.probe.heads import StageHeads, evaluate_heads, stage_losses
from ladder_siam.runtime import resume
from ladder_siam.runtime.distributed import DistributedEnv
from ladder_siam.runtime.health import FiniteCheck
from ladder_siam.runtime.loop import IntervalLog, set_lr, wrap_ddp
from ladder_siam.runtime.optim import scaled_lr
from ladder_siam.runtime.progress import Progress
from ladder_siam.runtime.schedules import warmup_cosine
from ladder_siam.runtime.train_log import TrainLog

logger = logging.getLogger(__name__)
LOOP = "standard linear probe"


@dataclass
class StandardRun:
    """The state the training loop shares."""

    config: ProbeConfig
    env: DistributedEnv
    backbone: PooledStages
    heads: StageHeads
    step_heads: torch.nn.Module
    optimizer: torch.optim.SGD
    lr: torch.Tensor
    total_steps: int
    inputs: dict[str, str]
    train_log: TrainLog | None = None
    step: int = 0


def save_checkpoint(run: StandardRun) -> None:
    """Rank 0 writes the heads, optimizer, step and random state."""
    if run.env.is_main:
        parts = {"heads": run.heads, "optimizer": run.optimizer}
        resume.save(run.config, run.step, parts, run.inputs)


def train_one_epoch(
    run: StandardRun,
    loader: torch.utils.data.DataLoader,
    finite: FiniteCheck,
    interval: IntervalLog,
    progress: Progress,
) -> None:
    """Steps through one epoch's batches (from the resumed position) until it or the run ends."""
    config, device = run.config, run.env.device
    run.heads.train()
    for images, labels in loader:
        if run.step >= run.total_steps:
            return
        set_lr(run.optimizer, float(run.lr[run.step]))
        with torch.no_grad():
            features = run.backbone(to_model_input(images, device))
        losses = stage_losses(run.step_heads(features), labels.to(device, non_blocking=True))
        run.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        run.optimizer.step()
        run.step += 1
        finite.submit(run.step, losses)
        interval.add(losses, config.batch_size)
        progress.update(1)
        if run.step % config.log_every == 0 or run.step == run.total_steps:
            finite.check()
            interval.write(run.step, float(run.lr[run.step - 1]), progress)
        if run.step % config.checkpoint_every == 0 or run.step == run.total_steps:
            finite.check()
            save_checkpoint(run)


def run_standard(
    config: ProbeConfig,
    env: DistributedEnv,
    backbone: PooledStages,
    train: SplitManifest,
    val: SplitManifest,
) -> dict[str, dict[str, Any]]:
    """Trains (or resumes) the augmented linear probe; returns ``{stage: {"top1", "top5"}}``.

    Every rank evaluates the heads on the gathered validation features.

    Raises:
        ResumeError: A checkpoint under ``config.out`` belongs to other settings or to
            another backbone.
    """
    torch.manual_seed(config.seed)
    dataset = ShardDataset(
        train, config.batch_size // env.world_size, RandomCropFlip(config.image_size),
        env.rank, env.world_size, seed=config.seed, decode_size=config.image_size,
    )  # fmt: skip
    steps_per_epoch = dataset.batches_per_epoch
    schedule_steps = config.epochs * steps_per_epoch
    heads = StageHeads(backbone.channels, len(train.classes), config.batch_norm).to(env.device)
    optimizer = torch.optim.SGD(
        heads.parameters(), lr=0.0, momentum=config.momentum, weight_decay=config.weight_decay
    )
    run = StandardRun(
        config=config, env=env, backbone=backbone, heads=heads, step_heads=wrap_ddp(heads, env),
        optimizer=optimizer,
        lr=warmup_cosine(scaled_lr(config.base_lr, config.batch_size), schedule_steps, 0),
        total_steps=min(schedule_steps, config.max_steps or schedule_steps),
        inputs={"backbone": resume.fingerprint(config.backbone)},
    )  # fmt: skip
    resumed = resume.resume(config.out, config, run.inputs, map_location=env.device)
    if resumed is not None:
        resume.restore(resumed, {"heads": heads, "optimizer": optimizer})
        run.step = resumed.step
    run.train_log = TrainLog(config.out, resumed.step if resumed else None, env.is_main)
    if env.is_main:
        logger.info(
            "standard linear probe of %s on %d x %s: %d steps of %d images, %d per epoch",
            ",".join(backbone.stages), env.world_size, env.device.type, run.total_steps,
            config.batch_size, steps_per_epoch,
        )  # fmt: skip
    finite = FiniteCheck(LOOP)
    interval = IntervalLog(LOOP, run.total_steps, run.train_log, env.is_main)
    with Progress(run.total_steps, "linear probe", "step", logger, enabled=env.is_main) as progress:
        progress.update(run.step)
        while run.step < run.total_steps:
            dataset.set_epoch(run.step // steps_per_epoch, run.step % steps_per_epoch)
            loader = make_loader(dataset, config.workers, pin_memory=env.device.type == "cuda")
            train_one_epoch(run, loader, finite, interval, progress)
    transform = EvalTransform(config.image_size, config.resize_size)
    val_set = extract_features(
        backbone, val, transform, config.extract_batch_size, config.workers, env.device,
        report=env.is_main,
    )  # fmt: skip
    return evaluate_heads(heads, val_set.features, val_set.labels)
