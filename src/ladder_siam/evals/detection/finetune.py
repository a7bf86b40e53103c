"""``ladder-siam finetune-detection``: Mask R-CNN FPN finetune and COCO box/mask AP.

The paper's detection protocol (Sec. 4.2, Tables 1 and 2): Mask R-CNN with FPN on the
pretrained ResNet, trained on COCO ``train2017`` with the 1x schedule and evaluated on
``val2017`` for box and mask mAP with one model. Run it with ``ladder-siam finetune-detection``
or ``torchrun --nproc-per-node=8 -m ladder_siam.evals.detection.finetune``.

Normalisation follows the SSL-transfer setting rather than torchvision's supervised one: all
backbone stages are finetuned with trainable BatchNorm (SyncBN under torchrun on GPUs), and
the FPN and heads have BatchNorm too, as in MoCo's and DenseCL's detectron2 configs; a
self-supervised backbone's BatchNorm statistics are not ImageNet-supervised ones, so freezing
them (``FrozenBatchNorm2d``) would be wrong. See :mod:`ladder_siam.evals.detection.model`.

The loop: loader workers decode images, instance boxes and RLE masks from COCO-layout shards
and flip them; SGD with warm-up and step decay trains the model; checkpoints are written every
``checkpoint_every`` steps and the newest is resumed at its exact data position; finally the
val split is read exactly once over all ranks, predictions are gathered on rank 0 and scored
with pycocotools, and ``OUT/metrics.json`` is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ladder_siam.data.manifest import ManifestError, SplitManifest, load_split
from ladder_siam.data.shards import ShardDataset, make_loader
from ladder_siam.data.splits import SplitReader, make_eval_loader
from ladder_siam.evals.detection.coco_eval import ImageDetections, coco_evaluate
from ladder_siam.evals.detection.config import (
    DetectionConfig,
    add_arguments,
    config_from_args,
)
from ladder_siam.evals.detection.data import TrainTransform, collate_lists, eval_transform
from ladder_siam.evals.detection.model import build_mask_rcnn, param_groups
from ladder_siam.io import storage
from ladder_siam.nets.backbone_file import load_backbone
from ladder_siam.runtime import distributed, resume, tracking
from ladder_siam.runtime.health import FiniteCheck
from ladder_siam.runtime.loop import (
    IntervalLog,
    autocast,
    broadcast_buffers,
    convert_sync_bn,
    cpu_threads,
    set_lr,
    wrap_ddp,
)
from ladder_siam.runtime.metrics import push_job_metrics
from ladder_siam.runtime.progress import Progress
from ladder_siam.runtime.run_folder import metrics_uri, run_of
from ladder_siam.runtime.train_log import TrainLog

logger = logging.getLogger(__name__)
LOOP = "detection finetune"


@dataclasses.dataclass
class Finetune:
    """The state of a finetune that the loop functions share."""

    config: DetectionConfig
    env: distributed.DistributedEnv
    model: nn.Module
    step_model: nn.Module
    optimizer: torch.optim.SGD
    dataset: ShardDataset
    train_log: TrainLog
    inputs: dict[str, str]
    step: int = 0


def finetune_detection(config: DetectionConfig) -> dict[str, Any]:
    """Finetunes Mask R-CNN on the backbone, evaluates it on COCO AP, writes metrics.json.

    A run resumes from the newest checkpoint under ``config.out``.

    Returns:
        The contents of ``OUT/metrics.json`` (on every rank).

    Raises:
        UsageError: A bad setting or input (not COCO-layout shards, a backbone of the wrong
            architecture or with non-finite weights...), detected before training starts.
        NonFiniteLossError: A training loss became NaN or infinite.
    """
    env = distributed.setup()
    try:
        config.validate(env.world_size)
        with cpu_threads(config.cpu_threads):
            return _run(config, env)
    finally:
        distributed.cleanup()


def load_splits(config: DetectionConfig) -> tuple[SplitManifest, SplitManifest]:
    """The train and val splits, checked to be COCO-layout shards with the same classes."""
    train = load_split(config.train, "train")
    train.require_layout("coco")
    val = load_split(config.val, "val")
    val.require_layout("coco")
    if train.classes != val.classes:
        raise ManifestError(
            f"{config.train} and {config.val}: different classes "
            f"({len(train.classes)} vs {len(val.classes)}); the label spaces must match"
        )
    return train, val


def _run(config: DetectionConfig, env: distributed.DistributedEnv) -> dict[str, Any]:
    train_split, val_split = load_splits(config)
    backbone, info = load_backbone(config.backbone, config.arch)
    run = build_finetune(config, env, backbone, len(train_split.classes), train_split)
    logger.info(
        "finetuning Mask R-CNN on a %s%s (%d classes) on %d x %s: %d steps of %d images",
        info.arch, " (small-input stem)" if info.small_input else "", len(train_split.classes),
        env.world_size, env.device.type, config.iterations, config.batch_size,
    )  # fmt: skip
    train(run)
    broadcast_buffers(run.model, env)
    results, val_images = evaluate(run.model, val_split, config, env)
    metrics = {
        "preset": config.preset,
        "arch": info.arch,
        "small_input": info.small_input,
        **results,
        "iterations": run.step,
        "val_images": val_images,
        "scalars": {
            "box_AP": results["bbox"]["AP"],
            "box_AP50": results["bbox"]["AP50"],
            "mask_AP": results["segm"]["AP"],
            "mask_AP50": results["segm"]["AP50"],
        },
    }
    if env.is_main:
        uri = metrics_uri(config.out)
        storage.write_text(uri, json.dumps(metrics, indent=2) + "\n")
        push_job_metrics(
            "finetune-detection",
            {f"detection_{k.lower()}_ratio": v / 100 for k, v in metrics["scalars"].items()},
            run=run_of(config.out),
        )
        tracking.log_scalars("finetune-detection", metrics["scalars"], dataclasses.asdict(config))
        logger.info("detection metrics written to %s", uri)
    return metrics


def build_finetune(
    config: DetectionConfig,
    env: distributed.DistributedEnv,
    backbone: nn.Module,
    num_classes: int,
    train_split: SplitManifest,
) -> Finetune:
    """The model, optimizer and loader of a run, resumed from its newest checkpoint if any.

    Raises:
        ResumeError: A checkpoint under ``config.out`` belongs to other settings or to
            another backbone.
    """
    torch.manual_seed(config.seed)
    model = build_mask_rcnn(backbone, num_classes + 1, config)
    if config.sync_bn:
        model = convert_sync_bn(model, env)
    model = model.to(env.device)
    optimizer = torch.optim.SGD(
        param_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum
    )
    dataset = ShardDataset(
        train_split, config.batch_size // env.world_size, TrainTransform(config.flip_prob),
        env.rank, env.world_size, seed=config.seed, buffer_size=config.buffer_size,
        collate=collate_lists,
    )  # fmt: skip
    inputs = {"backbone": resume.fingerprint(config.backbone)}
    resumed = resume.resume(config.out, config, inputs, map_location=env.device)
    if resumed is not None:
        resume.restore(resumed, {"model": model, "optimizer": optimizer})
    step = resumed.step if resumed else 0
    train_log = TrainLog(config.out, resumed.step if resumed else None, env.is_main)
    return Finetune(
        config, env, model, wrap_ddp(model, env), optimizer, dataset, train_log, inputs, step
    )


def train(run: Finetune) -> None:
    """Trains from ``run.step`` to ``config.iterations``, one loader per epoch."""
    config, env = run.config, run.env
    steps_per_epoch = run.dataset.batches_per_epoch
    finite = FiniteCheck(LOOP)
    interval = IntervalLog(LOOP, config.iterations, run.train_log, env.is_main)
    with Progress(config.iterations, LOOP, "step", logger, env.is_main) as progress:
        progress.update(run.step)
        while run.step < config.iterations:
            # The loader is deterministic per (seed, epoch, batch): resuming mid-epoch at this
            # batch yields exactly the batches an uninterrupted run would have trained on.
            run.dataset.set_epoch(run.step // steps_per_epoch, run.step % steps_per_epoch)
            loader = make_loader(run.dataset, config.workers, env.device.type == "cuda")
            train_one_epoch(run, loader, finite, interval, progress)


def train_one_epoch(
    run: Finetune,
    loader: torch.utils.data.DataLoader,
    finite: FiniteCheck,
    interval: IntervalLog,
    progress: Progress,
) -> None:
    """Steps through one epoch's batches (from the resumed position) until it or the run ends."""
    config, device = run.config, run.env.device
    run.model.train()
    for images, targets in loader:
        lr = config.lr * config.lr_factor(run.step)
        set_lr(run.optimizer, lr)
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with autocast(device, config.precision):
            losses = run.step_model(images, targets)
        loss = sum(losses.values())
        loss.backward()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        values = {"loss": loss.detach(), **{name: v.detach() for name, v in losses.items()}}
        finite.submit(run.step, values)
        interval.add(values, config.batch_size)
        progress.update(1)
        if run.step % config.log_every == 0 or run.step == config.iterations:
            finite.check()
            interval.write(run.step, lr, progress)
        if run.step % config.checkpoint_every == 0 or run.step == config.iterations:
            finite.check()
            save_checkpoint(run)
        if run.step == config.iterations:
            return


def save_checkpoint(run: Finetune) -> None:
    """Rank 0 writes the model, optimizer, random state and configuration at ``run.step``."""
    if run.env.is_main:
        parts = {"model": run.model, "optimizer": run.optimizer}
        resume.save(run.config, run.step, parts, run.inputs)


@torch.no_grad()
def evaluate(
    model: nn.Module, split: SplitManifest, config: DetectionConfig, env: distributed.DistributedEnv
) -> tuple[dict[str, dict[str, float | None]], int]:
    """COCO box and mask AP on ``split``: every image read once over all ranks, in fp32.

    Returns:
        ``{"bbox": {...}, "segm": {...}}`` in percent (see ``coco_eval.coco_evaluate``) and
        the number of images evaluated, the same on every rank.
    """
    model.eval()
    reader = SplitReader(split, config.eval_batch_size, eval_transform, collate=collate_lists)
    records: list[dict[str, Any]] = []
    detections: list[ImageDetections] = []
    # Each rank reads its own share, so a total is known only for a single process.
    total = split.num_samples if env.world_size == 1 else None
    with Progress(total, "detection evaluation", "img", logger, env.is_main) as bar:
        for images, batch_records in make_eval_loader(reader, config.workers):
            outputs = model([image.to(env.device, non_blocking=True) for image in images])
            for record, output in zip(batch_records, outputs, strict=True):
                records.append(record)
                detections.append(ImageDetections.from_output(record["image_id"], output))
            bar.update(len(images))
    records, detections = _gather_on_main((records, detections), env)
    shared: list[Any] = [None]
    if env.is_main:
        shared = [(coco_evaluate(records, detections, split.classes), len(records))]
    if env.world_size > 1:
        dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _gather_on_main(
    local: tuple[list[dict[str, Any]], list[ImageDetections]], env: distributed.DistributedEnv
) -> tuple[list[dict[str, Any]], list[ImageDetections]]:
    """Every rank's records and detections, concatenated on rank 0 (empty elsewhere).

    Gathered to rank 0 only: COCO-scale masks are hundreds of megabytes as RLE, and only
    rank 0 scores them.
    """
    if env.world_size == 1:
        return local
    parts: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(local, parts, dst=0)
    if parts is None:
        return [], []
    return (
        [record for part in parts for record in part[0]],
        [detection for part in parts for detection in part[1]],
    )


def get_args_parser() -> argparse.ArgumentParser:
    """Options of ``ladder-siam finetune-detection`` (every field of DetectionConfig)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> None:
    """Runs :func:`finetune_detection` from parsed arguments."""
    finetune_detection(config_from_args(args))


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    main(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args())
