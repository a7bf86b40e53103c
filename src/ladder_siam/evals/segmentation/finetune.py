"""``ladder-siam finetune-segmentation``: FCN-D8 finetune of a backbone, then its mIoU.

The paper's semantic segmentation benchmark (Sec. 4.1, Tables 1 and 2): mmsegmentation's
FCN-D8 (see :mod:`ladder_siam.evals.segmentation.model`) is finetuned end to end on PASCAL VOC
(512 px crops, 20k iterations) or Cityscapes (769 px, 40k) and scored by mIoU on the val
split. Run with ``ladder-siam finetune-segmentation`` or ``torchrun --nproc-per-node=4 -m
ladder_siam.evals.segmentation.finetune``. The loop:

1. loader workers scale, crop, flip and pad image and mask (:mod:`.data`);
2. SGD with a poly learning-rate decay steps on the cross-entropy of the main and auxiliary
   heads; every ``log_every`` iterations a ``train_log.jsonl`` record, every
   ``checkpoint_every`` an atomic checkpoint, resumed automatically at its exact data position;
3. every val image is predicted exactly once over all ranks, the confusion matrices are
   summed (:mod:`ladder_siam.evals.segmentation.scoring`), and rank 0 writes ``OUT/metrics.json``
   (scores in percent).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet

from ladder_siam.data.manifest import (
    IGNORE_LABEL,
    ManifestError,
    SplitManifest,
    load_split,
)
from ladder_siam.data.shards import ShardDataset, make_loader
from ladder_siam.errors import UsageError
from ladder_siam.evals.segmentation.config import (
    SegmentationConfig,
    add_arguments,
    config_from_args,
)
from ladder_siam.evals.segmentation.data import SegmentationTrainTransform, normalize_images
from ladder_siam.evals.segmentation.miou import SegmentationScores
from ladder_siam.evals.segmentation.model import FCN, dilate_resnet
from ladder_siam.evals.segmentation.scoring import evaluate, per_image_counts
from ladder_siam.io import storage
from ladder_siam.nets.backbone_file import BackboneInfo, load_backbone
from ladder_siam.runtime import distributed, resume, tracking
from ladder_siam.runtime.health import FiniteCheck
from ladder_siam.runtime.loop import (
    IntervalLog,
    autocast,
    broadcast_buffers,
    convert_sync_bn,
    set_lr,
    wrap_ddp,
)
from ladder_siam.runtime.metrics import push_job_metrics
from ladder_siam.runtime.per_image import write_per_image
from ladder_siam.runtime.progress import Progress
from ladder_siam.runtime.run_folder import metrics_uri, run_of
from ladder_siam.runtime.train_log import TrainLog

logger = logging.getLogger(__name__)
LOOP = "segmentation finetune"


@dataclass
class Finetune:
    """The state of a run that the loop functions share."""

    config: SegmentationConfig
    env: distributed.DistributedEnv
    model: FCN
    step_model: nn.Module
    optimizer: torch.optim.SGD
    lr: torch.Tensor
    train_log: TrainLog
    inputs: dict[str, str]
    step: int = 0


def poly_lr(base: float, minimum: float, power: float, iterations: int) -> torch.Tensor:
    """The learning rate of each iteration, as mmseg's ``PolyLR``.

    ``lr(t) = (base - minimum) * (1 - t / iterations) ** power + minimum``.
    """
    progress = torch.arange(iterations, dtype=torch.float64) / iterations
    return (base - minimum) * (1 - progress) ** power + minimum


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy, ignoring label 255, averaged over all pixels.

    mmseg's default (``avg_non_ignore=False``) divides by every pixel, ignored ones counting
    zero, rather than by the labelled ones; it also keeps a crop that is all padding finite.
    """
    losses = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_LABEL, reduction="none")
    return losses.mean()


def build_model(
    config: SegmentationConfig,
    backbone: nn.Module,
    info: BackboneInfo,
    num_classes: int,
    env: distributed.DistributedEnv,
) -> FCN:
    """FCN-D8 on the loaded backbone, with SyncBN across GPUs, on the training device."""
    model = FCN(
        dilate_resnet(cast(ResNet, backbone), info.small_input), num_classes,
        config.head_channels, config.aux_channels, config.dropout, config.align_corners,
    )  # fmt: skip
    if config.sync_bn:
        model = convert_sync_bn(model, env)
    return model.to(env.device)


def training_step(
    run: Finetune, images: torch.Tensor, masks: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One SGD iteration on a batch; returns its losses by name (detached, on the device)."""
    config, device = run.config, run.env.device
    set_lr(run.optimizer, float(run.lr[run.step]))
    with autocast(device, config.precision):
        logits, aux_logits = run.step_model(normalize_images(images, device))
    masks = masks.to(device, non_blocking=True)
    losses = {"loss_main": segmentation_loss(logits, masks)}
    if aux_logits is not None:
        losses["loss_aux"] = segmentation_loss(aux_logits, masks)
    loss = losses["loss_main"] + config.aux_weight * losses.get("loss_aux", 0.0)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.step += 1
    return {"loss": loss.detach(), **{name: value.detach() for name, value in losses.items()}}


def train(run: Finetune, dataset: ShardDataset) -> None:
    """Runs the iterations left after the resumed step; the data position follows the step."""
    config, env = run.config, run.env
    finite = FiniteCheck(LOOP)
    interval = IntervalLog(LOOP, config.iterations, run.train_log, env.is_main)
    with Progress(config.iterations, LOOP, "it", logger, enabled=env.is_main) as progress:
        progress.update(run.step)
        while run.step < config.iterations:
            epoch, start_batch = divmod(run.step, dataset.batches_per_epoch)
            dataset.set_epoch(epoch, start_batch)
            loader = make_loader(dataset, config.workers, pin_memory=env.device.type == "cuda")
            for images, masks in loader:
                losses = training_step(run, images, masks)
                finite.submit(run.step, losses)
                interval.add(losses, images.shape[0] * env.world_size)
                progress.update(1)
                if run.step % config.log_every == 0 or run.step == config.iterations:
                    finite.check()
                    interval.write(run.step, float(run.lr[run.step - 1]), progress)
                if run.step % config.checkpoint_every == 0 or run.step == config.iterations:
                    finite.check()
                    save_checkpoint(run)
                if run.step == config.iterations:
                    break


def save_checkpoint(run: Finetune) -> None:
    """Rank 0 writes the model, optimizer, random state and settings at the current step."""
    if run.env.is_main:
        parts = {"model": run.model, "optimizer": run.optimizer}
        resume.save(run.config, run.step, parts, run.inputs)


def _load_splits(config: SegmentationConfig) -> tuple[SplitManifest, SplitManifest]:
    train_split = load_split(config.train, "train")
    train_split.require_layout("voc")
    val_split = load_split(config.val, "val")
    val_split.require_layout("voc")
    if train_split.classes != val_split.classes:
        raise ManifestError(
            f"{config.val}: classes {val_split.classes} differ from the training shards' "
            f"{train_split.classes} ({config.train})"
        )
    if not 2 <= len(train_split.classes) <= IGNORE_LABEL:
        raise ManifestError(
            f"{config.train}: {len(train_split.classes)} classes; segmentation needs 2 to "
            f"{IGNORE_LABEL} (index {IGNORE_LABEL} marks ignored pixels)"
        )
    return train_split, val_split


def finetune_segmentation(config: SegmentationConfig) -> dict[str, Any]:
    """Finetunes FCN-D8 on a backbone, evaluates mIoU and writes ``OUT/metrics.json``.

    A run with checkpoints under ``config.out`` resumes from the newest one, provided its
    settings and the backbone file are unchanged.

    Args:
        config: The run's settings (see :func:`make_config`).

    Returns:
        The content of ``metrics.json``.

    Raises:
        UsageError: A bad setting, shards of another layout (``ManifestError``), a backbone
            that is missing, not a ResNet or not ``config.arch``, or a checkpoint of other
            settings or another backbone; all before training.
        NonFiniteLossError: The loss became NaN or infinite.
    """
    env = distributed.setup()
    try:
        config.validate(env.world_size)
        return _run(config, env)
    finally:
        distributed.cleanup()


def _run(config: SegmentationConfig, env: distributed.DistributedEnv) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    train_split, val_split = _load_splits(config)
    try:
        backbone, info = load_backbone(config.backbone, config.arch)
        inputs = {"backbone": resume.fingerprint(config.backbone)}
    except FileNotFoundError as error:
        raise UsageError(f"--backbone {config.backbone}: no such file") from error
    transform = SegmentationTrainTransform(
        config.crop_size, config.scale, config.ratio_range, config.cat_max_ratio
    )
    dataset = ShardDataset(
        train_split, config.batch_size // env.world_size, transform, env.rank, env.world_size,
        seed=config.seed, buffer_size=config.buffer_size,
    )  # fmt: skip
    model = build_model(config, backbone, info, len(train_split.classes), env)
    # mmseg's SGD: one group, weight decay on every parameter.
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay,
    )  # fmt: skip
    resumed = resume.resume(config.out, config, inputs, map_location=env.device)
    if resumed is not None:
        resume.restore(resumed, {"model": model, "optimizer": optimizer})
    run = Finetune(
        config=config, env=env, model=model, step_model=wrap_ddp(model, env), optimizer=optimizer,
        lr=poly_lr(config.lr, config.min_lr, config.power, config.iterations),
        train_log=TrainLog(config.out, resumed.step if resumed else None, env.is_main),
        inputs=inputs, step=resumed.step if resumed else 0,
    )  # fmt: skip
    logger.info(
        "finetuning FCN-D8 on %s%s: %d iterations of %d x %d px crops, %d classes, on %d x %s",
        info.arch, " (small input)" if info.small_input else "", config.iterations,
        config.batch_size, config.crop_size, len(train_split.classes), env.world_size,
        env.device.type,
    )  # fmt: skip
    model.train()
    train(run, dataset)
    broadcast_buffers(model, env)
    # Per-image counts only from a single process: ranks score disjoint shares of the split.
    matrices: list[torch.Tensor] | None = [] if env.world_size == 1 else None
    scores = evaluate(model, val_split, config, env, matrices)
    metrics = _metrics(config, info, scores)
    if env.is_main:
        if matrices:
            write_per_image(config.out, per_image_counts(matrices, val_split))
        storage.write_text(metrics_uri(config.out), json.dumps(metrics, indent=2))
        logger.info(
            "segmentation %s: mIoU %.2f, pixel accuracy %.2f, mean accuracy %.2f (%s)",
            config.preset, scores.miou, scores.pixel_accuracy, scores.mean_accuracy,
            metrics_uri(config.out),
        )  # fmt: skip
        push_job_metrics(
            "finetune-segmentation",
            {
                "segmentation_miou_ratio": scores.miou / 100,
                "segmentation_pixel_accuracy_ratio": scores.pixel_accuracy / 100,
                "segmentation_mean_accuracy_ratio": scores.mean_accuracy / 100,
            },
            run=run_of(config.out),
            grouping={"preset": config.preset, "arch": info.arch},
        )
        tracking.log_scalars("finetune-segmentation", metrics["scalars"], asdict(config))
    return metrics


def _metrics(
    config: SegmentationConfig, info: BackboneInfo, scores: SegmentationScores
) -> dict[str, Any]:
    return {
        "preset": config.preset,
        "arch": info.arch,
        "small_input": info.small_input,
        "backbone": config.backbone,
        "mIoU": scores.miou,
        "pixel_accuracy": scores.pixel_accuracy,
        "mean_accuracy": scores.mean_accuracy,
        "per_class_iou": scores.per_class_iou,
        "iterations": config.iterations,
        "scalars": {
            "mIoU": scores.miou,
            "pixel_accuracy": scores.pixel_accuracy,
            "mean_accuracy": scores.mean_accuracy,
        },
    }


def get_args_parser() -> argparse.ArgumentParser:
    """Options of ``ladder-siam finetune-segmentation`` (every field of the config)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> None:
    """Runs :func:`finetune_segmentation` from parsed arguments."""
    finetune_segmentation(config_from_args(args))


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    main(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args())
