"""Training-step time of the two finetune evaluations: Mask R-CNN FPN and FCN-D8.

Builds each finetune's real model and optimizer with the library's own builders
(``evals.detection.model.build_mask_rcnn`` and ``param_groups``; ``evals.segmentation.finetune
.build_model`` and its ``training_step``) on a randomly initialised torchvision ResNet, feeds
synthetic inputs already on the device at the preset's sizes, and times ``--steps`` optimizer
steps after ``--warmup`` untimed ones, under the preset's precision (the finetunes' own
``runtime.loop.autocast``). It reports seconds per iteration, images/s and peak GPU memory per
task, and the preset's iterations x s/iter.

What is measured, and what is not: one process, one device, the per-GPU batch of the preset's
recipe (coco-1x: 16 images on 8 GPUs, 2 each; voc: 16 on 4, 4 each). So iterations x s/iter is
a *per-GPU-share estimate* of the finetune's wall time: on N GPUs the same per-GPU batch adds
DDP's gradient all-reduce and SyncBN's statistics exchange, and the loader (JPEG and RLE mask
decoding, crops) must keep up, none of which this benchmark includes. Inputs are one fixed
batch: detection images all ``min_size`` x a 4:3 width (COCO's most common shape, 640x480,
resized), where real batches vary in shape and instance count.

GPU (the recipes' per-GPU batches): ``python benchmarks/bench_eval_step.py --task both``
CPU smoke (tiny presets, meaningless timings): ``python benchmarks/bench_eval_step.py --task both
--preset-detection tiny --preset-segmentation tiny --steps 2 --warmup 1
--out /tmp/evalbench.jsonl``

Results are appended as JSON lines to ``--out`` (one per task, with the machine and versions),
so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from timing import machine, sync, time_steps  # this folder is on sys.path

from ladder_siam.evals.detection.config import PRESETS as DETECTION_PRESETS
from ladder_siam.evals.detection.config import DetectionConfig
from ladder_siam.evals.detection.config import make_config as detection_config
from ladder_siam.evals.detection.model import build_mask_rcnn, param_groups
from ladder_siam.evals.segmentation.config import PRESETS as SEGMENTATION_PRESETS
from ladder_siam.evals.segmentation.config import SegmentationConfig
from ladder_siam.evals.segmentation.config import make_config as segmentation_config
from ladder_siam.evals.segmentation.finetune import (
    Finetune,
    build_model,
    poly_lr,
    training_step,
)
from ladder_siam.nets.archs import ARCHS
from ladder_siam.nets.backbone_file import BackboneInfo
from ladder_siam.nets.backbones import torchvision_resnet
from ladder_siam.runtime.distributed import DistributedEnv
from ladder_siam.runtime.loop import autocast, cpu_threads, set_lr
from ladder_siam.runtime.train_log import TrainLog

logger = logging.getLogger("bench_eval_step")

TASKS = ("detection", "segmentation")
# GPUs of each preset's recipe: its global batch over these is the per-GPU batch benchmarked.
# coco-1x is detectron2's 8 x 2 images, voc and cityscapes mmseg's 4 x 4 and 4 x 2; tiny and
# smoke are single-process CPU recipes.
RECIPE_GPUS = {
    "detection": {"coco-1x": 8, "tiny": 1, "smoke": 1},
    "segmentation": {"voc": 4, "cityscapes": 4, "tiny": 1, "smoke": 1},
}
# Object classes of each preset's dataset: COCO's 80 things; VOC's 20 and the background;
# Cityscapes' 19; the demo scenes' 6 shapes (and the background for segmentation).
PRESET_CLASSES = {
    "detection": {"coco-1x": 80, "tiny": 6, "smoke": 6},
    "segmentation": {"voc": 21, "cityscapes": 19, "tiny": 7, "smoke": 7},
}
SHARE_NOTE = (
    "per-GPU-share estimate: the same per-GPU batch on N GPUs adds the all-reduce and SyncBN "
    "time (and needs the loader to keep up), which this single-process benchmark does not "
    "include"
)

Step = Callable[[], None]


def detection_inputs(
    config: DetectionConfig, batch: int, classes: int, instances: int, device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """One synthetic Mask R-CNN batch on ``device``, in the shapes the detection loader yields.

    Images are float ``[3, H, W]`` in [0, 1], ``H = min_size`` and ``W`` its 4:3 width capped at
    ``max_size``, so the model's own resize keeps their size. Each has ``instances`` boxes
    (x1 < x2, y1 < y2, 3 % to 50 % of each side), labels in 1..classes (0 is the background)
    and uint8 masks filling an ellipse inside each box, as ``data.instance_targets`` returns.

    Args:
        config: The detection preset (``min_size``, ``max_size``).
        batch: Images per GPU.
        classes: Object classes, the background excluded.
        instances: Instances per image.
        device: Where the tensors go.

    Returns:
        The images and their targets (``boxes``, ``labels``, ``masks``), as two lists.
    """
    height = config.min_size
    width = min(round(height * 4 / 3), config.max_size)
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    for _ in range(batch):
        images.append(torch.rand((3, height, width), generator=generator))
        sizes = torch.rand((instances, 2), generator=generator) * 0.47 + 0.03
        sizes *= torch.tensor([width, height])
        corner = torch.rand((instances, 2), generator=generator)
        corner *= torch.tensor([width, height]) - sizes
        boxes = torch.cat([corner, corner + sizes], dim=1)
        masks = torch.zeros((instances, height, width), dtype=torch.uint8)
        for index, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            masks[index] = (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).to(torch.uint8)
        labels = torch.randint(1, classes + 1, (instances,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return (
        [image.to(device) for image in images],
        [{key: value.to(device) for key, value in target.items()} for target in targets],
    )


def detection_step(
    config: DetectionConfig,
    args: argparse.Namespace,
    batch: int,
    classes: int,
    device: torch.device,
) -> Step:
    """The detection finetune's model, optimizer and step on a fixed synthetic batch.

    Built as ``finetune.build_finetune`` builds it (seed, ``build_mask_rcnn`` with classes + 1,
    SGD over ``param_groups``); one process, so no SyncBN and no DDP. The step is the body of
    ``finetune.train_one_epoch`` without the loader, the logs and the checkpoints.

    Args:
        config: The detection preset.
        args: The parsed options (``--arch``, ``--small-input``, ``--instances``).
        batch: Images per step on this device.
        classes: Object classes, the background excluded.
        device: Where the model and the batch live.

    Returns:
        A function running one optimizer step.
    """
    torch.manual_seed(config.seed)
    backbone = torchvision_resnet(args.arch, args.small_input)
    model = build_mask_rcnn(backbone, classes + 1, config).to(device)
    model.train()
    optimizer = torch.optim.SGD(
        param_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum
    )
    images, targets = detection_inputs(config, batch, classes, args.instances, device)
    # The warm-up's smallest rate: the full rate on random heads could diverge in a few steps.
    lr = config.lr * config.lr_factor(0)

    def step() -> None:
        set_lr(optimizer, lr)
        with autocast(device, config.precision):
            losses = model(images, targets)
        loss = sum(losses.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def segmentation_step(
    config: SegmentationConfig,
    args: argparse.Namespace,
    batch: int,
    classes: int,
    device: torch.device,
) -> Step:
    """The segmentation finetune's model, optimizer and ``training_step`` on a fixed batch.

    Built as ``finetune._run`` builds it (seed, ``build_model``, one SGD group with weight
    decay on every parameter, the poly schedule). The batch is uint8 crops of
    ``crop_size`` and int64 labels in [0, classes) with ``--ignore-fraction`` of the pixels
    255, the loader's output, already on the device.

    Args:
        config: The segmentation preset.
        args: The parsed options (``--arch``, ``--small-input``, ``--ignore-fraction``,
            ``--steps`` and ``--warmup``, which the learning-rate schedule must cover).
        batch: Crops per step on this device.
        classes: Label classes, the background included.
        device: Where the model and the batch live.

    Returns:
        A function running one optimizer step.
    """
    torch.manual_seed(config.seed)
    env = DistributedEnv(0, 0, 1, device)
    backbone = torchvision_resnet(args.arch, args.small_input)
    model = build_model(config, backbone, BackboneInfo(args.arch, args.small_input), classes, env)
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay,
    )  # fmt: skip
    total = args.warmup + args.steps
    run = Finetune(
        config=config, env=env, model=model, step_model=model, optimizer=optimizer,
        lr=poly_lr(config.lr, config.min_lr, config.power, max(config.iterations, total)),
        train_log=TrainLog("unused", None, enabled=False), inputs={},
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    side = config.crop_size
    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=generator)
    masks = torch.randint(0, classes, (batch, side, side), generator=generator)
    masks[torch.rand((batch, side, side), generator=generator) < args.ignore_fraction] = 255
    images, masks = images.to(device), masks.to(device)

    def step() -> None:
        training_step(run, images, masks)

    return step


def bench_task(task: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Builds one task's finetune at its preset and measures its step.

    Args:
        task: ``detection`` or ``segmentation``.
        args: The parsed options.
        device: Where to run.

    Returns:
        The JSON record: settings, timings and the per-GPU-share wall-time estimate.

    Raises:
        SystemExit: The preset's global batch does not split over ``--gpus``.
    """
    preset = getattr(args, f"preset_{task}")
    overrides = {} if args.precision == "preset" else {"precision": args.precision}
    config: DetectionConfig | SegmentationConfig
    if task == "detection":
        config = detection_config(preset, **overrides)
    else:
        config = segmentation_config(preset, **overrides)
    gpus = args.gpus or RECIPE_GPUS[task][preset]
    batch = args.per_gpu_batch
    if batch is None:
        if config.batch_size % gpus:
            raise SystemExit(
                f"{task} preset {preset}: batch {config.batch_size} does not split over "
                f"{gpus} GPUs; set --gpus or --per-gpu-batch"
            )
        batch = config.batch_size // gpus
    classes = args.classes or PRESET_CLASSES[task][preset]
    build_start = time.perf_counter()
    if task == "detection":
        assert isinstance(config, DetectionConfig)
        with cpu_threads(config.cpu_threads):  # as the detection finetune runs
            step = detection_step(config, args, batch, classes, device)
            sync(device)
            build_seconds = time.perf_counter() - build_start
            timing = time_steps(step, args.steps, args.warmup, device)
        height = config.min_size
        shape = [height, min(round(height * 4 / 3), config.max_size)]
    else:
        assert isinstance(config, SegmentationConfig)
        step = segmentation_step(config, args, batch, classes, device)
        sync(device)
        build_seconds = time.perf_counter() - build_start
        timing = time_steps(step, args.steps, args.warmup, device)
        shape = [config.crop_size, config.crop_size]
    seconds = timing["seconds_per_iteration"]
    return {
        "task": task, "preset": preset, "arch": args.arch, "small_input": args.small_input,
        "precision": config.precision, "per_gpu_batch": batch, "recipe_gpus": gpus,
        "recipe_batch": config.batch_size, "input_hw": shape, "classes": classes,
        **({"instances_per_image": args.instances} if task == "detection" else {}),
        "steps": args.steps, "warmup": args.warmup, "build_seconds": build_seconds, **timing,
        "images_per_second": batch / seconds, "iterations": config.iterations,
        "per_gpu_share_hours": config.iterations * seconds / 3600, "estimate_note": SHARE_NOTE,
    }  # fmt: skip


def duration(seconds: float) -> str:
    """``seconds`` in the unit that reads best: s, min or h."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def summary_line(record: dict[str, Any]) -> str:
    """One human-readable line of a record, saying what the estimate is."""
    peak = f", peak {record['peak_memory_gib']:.2f} GiB" if record["peak_memory_gib"] else ""
    return (
        f"{record['task']} {record['preset']} ({record['arch']}, {record['precision']}, "
        f"{record['per_gpu_batch']} x {record['input_hw'][0]}x{record['input_hw'][1]} per GPU): "
        f"{record['seconds_per_iteration']:.3f} s/iter, {record['images_per_second']:.1f} "
        f"images/s{peak}; {record['iterations']} iterations x s/iter = "
        f"{duration(3600 * record['per_gpu_share_hours'])} ({SHARE_NOTE})"
    )


def get_args_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument(
        "--task", choices=(*TASKS, "both"), default="both", help="which finetune's step to time"
    )
    parser.add_argument(
        "--preset-detection", choices=list(DETECTION_PRESETS), default="coco-1x",
        help="detection preset: its image sizes, heads, RPN/ROI samples, batch and iterations",
    )  # fmt: skip
    parser.add_argument(
        "--preset-segmentation", choices=list(SEGMENTATION_PRESETS), default="voc",
        help="segmentation preset: its crop size, heads, batch and iterations",
    )  # fmt: skip
    parser.add_argument(
        "--arch", choices=ARCHS, default="resnet50", help="backbone (randomly initialised)"
    )
    parser.add_argument(
        "--small-input", action="store_true", help="the small-input stem (3x3, no max-pool)"
    )
    parser.add_argument(
        "--gpus", type=int, default=None,
        help="GPUs the preset's global batch is split over, giving the per-GPU batch timed "
        "(default: the recipe's: 8 for coco-1x, 4 for voc and cityscapes, 1 for tiny/smoke)",
    )  # fmt: skip
    parser.add_argument(
        "--per-gpu-batch", type=int, default=None,
        help="images per step on this device, for every task (overrides --gpus)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=("preset", "fp32", "bf16"), default="preset",
        help="training precision: the preset's (fp32 in all of them) or bf16 autocast",
    )  # fmt: skip
    parser.add_argument(
        "--classes", type=int, default=None,
        help="classes of the heads and labels (default: the preset's dataset: COCO 80, VOC 21, "
        "Cityscapes 19, the demo scenes 6 objects)",
    )  # fmt: skip
    parser.add_argument(
        "--instances", type=int, default=7,
        help="instances per detection image (COCO train2017 averages about 7)",
    )  # fmt: skip
    parser.add_argument(
        "--ignore-fraction", type=float, default=0.05,
        help="share of segmentation pixels labelled 255 (ignored), as padding and borders are",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument(
        "--warmup", type=int, default=5,
        help="untimed steps first (allocator growth, cuDNN/cuBLAS algorithm selection)",
    )  # fmt: skip
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "--out", default="bench_eval_step.jsonl", help="JSON lines, one appended per task"
    )
    return parser


def main(args: argparse.Namespace) -> None:
    """Benchmarks the chosen tasks and appends their records to ``--out``."""
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be at least 1 and --warmup at least 0")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    host = machine(device)
    logger.info("device %s; torch %s; torchvision %s", host["device"], torch.__version__,
                torchvision.__version__)  # fmt: skip
    if device.type != "cuda":
        logger.warning("no GPU: these timings are a smoke test and say nothing about GPUs")
    for task in TASKS if args.task == "both" else (args.task,):
        record = {**bench_task(task, args, device), **host}
        logger.info("%s", summary_line(record))
        with Path(args.out).open("a") as stream:
            stream.write(json.dumps(record) + "\n")
    logger.info("appended to %s", args.out)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    main(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args())
