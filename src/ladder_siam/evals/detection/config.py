"""The detection finetune's configuration: presets, command-line overrides, validation.

Precedence: the ``coco-1x`` defaults < the ``--preset`` < explicit flags. Every value is
checked before any work starts, and the whole configuration is stored in each checkpoint so
that a resume cannot silently change the recipe.
"""

from __future__ import annotations

import argparse
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

from ladder_siam.nets.archs import ARCHS
from ladder_siam.runtime.flags import add_config_flags
from ladder_siam.runtime.step_config import (
    PRECISIONS,
    at_least,
    between,
    check,
    from_preset,
    one_of,
    positive,
    preset_and_overrides,
    required,
    step_checks,
)

# One anchor size per FPN level: P2..P5 and the max-pooled P6 (Lin et al., FPN, Sec. 4.1).
FPN_LEVELS = 5
# The 1x recipe's learning rate is for 16 images per step; other batches scale it linearly
# (Goyal et al., as detectron2's REFERENCE_WORLD_SIZE scaling does).
REFERENCE_BATCH = 16


@dataclass
class DetectionConfig:
    """Everything one detection finetune depends on.

    The defaults are detectron2's Mask R-CNN R50-FPN 1x schedule, the paper's COCO protocol
    (Sec. 4.2): 90k iterations of 16 images, lr 0.02 dropped 10x at 60k and 80k after a
    1k-iteration linear warm-up, shorter side 800 (at most 1333), SGD with momentum 0.9 and
    weight decay 1e-4.
    """

    backbone: str = ""
    train: str = ""
    val: str = ""
    out: str = ""
    preset: str = "coco-1x"
    arch: str | None = None
    iterations: int = 90_000
    batch_size: int = 16
    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 1000
    warmup_factor: float = 0.001
    lr_steps: tuple[int, ...] = (60_000, 80_000)
    min_size: int = 800
    max_size: int = 1333
    flip_prob: float = 0.5
    fpn_channels: int = 256
    box_fc_dim: int = 1024
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 1000
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    rpn_batch_per_image: int = 256
    box_batch_per_image: int = 512
    detections_per_image: int = 100
    precision: str = "fp32"
    sync_bn: bool = True
    workers: int = 4
    cpu_threads: int | None = None
    eval_batch_size: int = 2
    buffer_size: int = 1000
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2

    @property
    def lr(self) -> float:
        """The peak learning rate at this batch size (linear scaling from 16 images)."""
        return self.base_lr * self.batch_size / REFERENCE_BATCH

    def lr_factor(self, step: int) -> float:
        """Multiplier of :attr:`lr` at ``step``: linear warm-up, then step decay by 10x.

        The warm-up ramps from ``warmup_factor`` to 1 as detectron2's WarmupMultiStepLR does.
        """
        factor = 0.1 ** bisect_right(self.lr_steps, step)
        if step < self.warmup_iterations:
            alpha = step / self.warmup_iterations
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor

    def validate(self, world_size: int = 1) -> None:
        """Raises ``UsageError`` naming the first bad setting."""
        check([
            *required(self, "backbone", "train", "val", "out"),
            one_of(self, "preset", PRESETS),
            one_of(self, "arch", ARCHS),
            one_of(self, "precision", PRECISIONS),
            at_least(self, "iterations", 1),
            *step_checks(self, world_size),
            positive(self, "base_lr"),
            at_least(self, "weight_decay", 0),
            between(self, "momentum", 0, 1, open_high=True),
            at_least(self, "warmup_iterations", 0),
            between(self, "warmup_factor", 0, 1, open_low=True),
            (
                list(self.lr_steps) == sorted(self.lr_steps),
                f"--lr-steps {','.join(map(str, self.lr_steps))}: must be increasing",
            ),
            at_least(self, "min_size", 16),
            (
                self.min_size <= self.max_size,
                f"--min-size {self.min_size}: must be at most --max-size ({self.max_size})",
            ),
            between(self, "flip_prob", 0, 1),
            (
                len(self.anchor_sizes) == FPN_LEVELS,
                f"--anchor-sizes {','.join(map(str, self.anchor_sizes))}: must be one size per "
                "FPN level P2..P6",
            ),
            at_least(self, "cpu_threads", 1),
            at_least(self, "eval_batch_size", 1),
        ])  # fmt: skip


# Differences from the 1x defaults. ``tiny`` runs in `make demo` within about a minute on two
# CPU cores: images resized to 64 px (the demo scenes' size order), few iterations, a narrow
# FPN and heads, anchors scaled to 8-40 px shapes, and RPN/ROI sample counts cut to what a
# few shapes per image need. Its learning rate is 0.02 at batch 4, four times the 1x rate
# per image: at the 1x rate, 40 steps from a demo backbone leave every AP at 0. It computes
# on one thread: a second one speeds these small convolutions up by only about 1.3x, and
# when other processes share the cores, OpenMP's spinning threads made the run 3x slower
# (109 s against 36 s on a busy 2-core machine).
PRESETS: dict[str, dict[str, Any]] = {
    "coco-1x": {},
    "tiny": {
        "iterations": 40,
        "batch_size": 4,
        "base_lr": 0.08,
        "warmup_iterations": 10,
        "lr_steps": (30, 36),
        "min_size": 64,
        "max_size": 64,
        "fpn_channels": 64,
        "box_fc_dim": 256,
        "anchor_sizes": (8, 16, 32, 64, 128),
        "rpn_pre_nms_train": 256,
        "rpn_post_nms_train": 128,
        "rpn_pre_nms_test": 128,
        "rpn_post_nms_test": 64,
        "rpn_batch_per_image": 64,
        "box_batch_per_image": 64,
        "detections_per_image": 20,
        "workers": 0,
        "eval_batch_size": 8,
        "buffer_size": 100,
        "log_every": 10,
        "checkpoint_every": 20,
    },
}
# tiny's shapes for a few iterations: proves the step runs end to end (a new cluster, a
# pipeline test of many arms); its scores mean nothing.
PRESETS["smoke"] = {
    **PRESETS["tiny"], "iterations": 4, "warmup_iterations": 1, "lr_steps": (3,),
    "log_every": 2, "checkpoint_every": 2,
}  # fmt: skip

HELP = {
    "backbone": "backbone.pt of a pretraining run (a torchvision ResNet state_dict)",
    "train": "COCO-layout training shards: a dataset URI (its train split) or a split URI",
    "val": "COCO-layout evaluation shards: a dataset URI (its val split) or a split URI",
    "out": "output URI: metrics.json and checkpoints/",
    "preset": "recipe: coco-1x (default; the paper's Mask R-CNN 1x schedule), tiny (CPU demo) "
    "or smoke (4 iterations: checks the step runs end to end)",
    "arch": "the architecture the backbone must be (checked before training); default: any",
    "iterations": "optimizer steps (1x: 90k)",
    "batch_size": "images per step over all GPUs (1x: 16, two per GPU on eight GPUs)",
    "base_lr": "learning rate per 16 images; scaled linearly with --batch-size",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay (not on normalisation parameters, as in detectron2)",
    "warmup_iterations": "linear warm-up steps (detectron2: 1000)",
    "warmup_factor": "learning-rate factor at the first warm-up step",
    "lr_steps": "steps at which the learning rate drops 10x, e.g. 60000,80000",
    "min_size": "shorter image side after resizing (1x: 800)",
    "max_size": "longer image side limit after resizing (1x: 1333)",
    "flip_prob": "probability of a horizontal flip of a training image",
    "fpn_channels": "FPN and mask/box-head conv width (Mask R-CNN: 256)",
    "box_fc_dim": "box head fully connected width (Mask R-CNN: 1024)",
    "anchor_sizes": "anchor size in pixels per FPN level P2..P6, e.g. 32,64,128,256,512",
    "rpn_pre_nms_train": "RPN proposals per level before NMS, training",
    "rpn_post_nms_train": "RPN proposals kept per image after NMS, training",
    "rpn_pre_nms_test": "RPN proposals per level before NMS, evaluation",
    "rpn_post_nms_test": "RPN proposals kept per image after NMS, evaluation",
    "rpn_batch_per_image": "anchors sampled per image for the RPN loss",
    "box_batch_per_image": "proposals sampled per image for the box and mask losses",
    "detections_per_image": "detections kept per image (COCO evaluates at most 100)",
    "precision": "fp32, or bf16 autocast for training (GPUs); evaluation runs in fp32",
    "sync_bn": "synchronise BatchNorm across GPUs under torchrun (the SSL-transfer setting)",
    "workers": "data-loader processes per GPU (0: load in the training process)",
    "cpu_threads": "torch intra-op threads of each process (default: torch's choice)",
    "eval_batch_size": "images per evaluation batch per GPU",
    "buffer_size": "samples in each loader worker's shuffle buffer",
    "seed": "seed of head initialisation, data order and augmentation",
    "log_every": "steps per loss log line",
    "checkpoint_every": "steps between checkpoints (one is always written after training)",
    "keep_checkpoints": "newest checkpoints to keep",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per field; unset flags stay out of the namespace (the preset applies)."""
    add_config_flags(parser, DetectionConfig, HELP, choices={"preset": list(PRESETS)})


def make_config(preset: str = DetectionConfig.preset, **overrides: Any) -> DetectionConfig:
    """The ``preset``'s configuration with ``overrides`` applied on top.

    Raises:
        UsageError: An unknown preset.
    """
    return from_preset(DetectionConfig, PRESETS, preset, preset=preset, **overrides)


def config_from_args(args: argparse.Namespace) -> DetectionConfig:
    """Merges the defaults, the ``--preset`` and explicit flags."""
    preset, overrides = preset_and_overrides(args, DetectionConfig, DetectionConfig.preset)
    return make_config(preset, **overrides)
