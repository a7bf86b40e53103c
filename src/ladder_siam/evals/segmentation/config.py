"""Settings of ``ladder-siam finetune-segmentation``: presets, command-line flags, validation.

Precedence: dataclass defaults (the VOC recipe) < ``--preset`` < explicit flags. The presets
are the paper's two benchmarks, as mmsegmentation's FCN-D8 configs set them (Sec. 4.1:
"input resolution 512x512, 20k iterations" on VOC and "769x769, 40k iterations" on
Cityscapes), and ``tiny``, a CPU-sized run on the demo scenes for ``make demo`` and tests.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
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

EVAL_MODES = ("whole", "slide")


@dataclass
class SegmentationConfig:
    """Everything one finetune depends on (stored in its checkpoints).

    Defaults are mmseg's ``fcn_r50-d8_512x512_20k_voc12aug``: SGD with momentum 0.9, weight
    decay 5e-4, lr 0.01 with a power-0.9 poly decay to 1e-4, batch 16 (4 GPUs x 4).
    """

    backbone: str = ""
    train: str = ""
    val: str = ""
    out: str = ""
    preset: str = "voc"
    arch: str | None = None
    iterations: int = 20000
    batch_size: int = 16
    crop_size: int = 512
    scale: list[int] = field(default_factory=lambda: [2048, 512])
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    lr: float = 0.01
    min_lr: float = 1e-4
    power: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 5e-4
    head_channels: int = 512
    aux_channels: int = 256
    aux_weight: float = 0.4
    dropout: float = 0.1
    align_corners: bool = False
    eval_mode: str = "whole"
    slide_crop: int = 769
    slide_stride: int = 513
    eval_batch_size: int = 1
    precision: str = "fp32"
    sync_bn: bool = True
    workers: int = 4
    buffer_size: int = 1000
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 2000
    keep_checkpoints: int = 2

    def validate(self, world_size: int = 1) -> None:
        """Raises ``UsageError`` naming the first bad setting."""
        check([
            *required(self, "backbone", "train", "val", "out"),
            one_of(self, "preset", PRESETS),
            one_of(self, "arch", ARCHS),
            at_least(self, "iterations", 1),
            *step_checks(self, world_size),
            at_least(self, "crop_size", 8),
            (
                len(self.scale) == 2 and min(self.scale) >= 1,
                f"--scale {self.scale}: must be two positive sides (long,short)",
            ),
            (
                len(self.ratio_range) == 2 and 0 < self.ratio_range[0] <= self.ratio_range[1],
                f"--ratio-range {self.ratio_range}: must be 0 < low <= high",
            ),
            between(self, "cat_max_ratio", 0, 1, open_low=True),
            (0 <= self.min_lr < self.lr, f"--min-lr {self.min_lr}: must be in [0, --lr)"),
            positive(self, "power"),
            between(self, "momentum", 0, 1, open_high=True),
            at_least(self, "weight_decay", 0),
            at_least(self, "head_channels", 1),
            at_least(self, "aux_channels", 0),
            at_least(self, "aux_weight", 0),
            between(self, "dropout", 0, 1, open_high=True),
            one_of(self, "eval_mode", EVAL_MODES),
            (
                0 < self.slide_stride <= self.slide_crop,
                f"--slide-stride {self.slide_stride}: must be in 1..--slide-crop "
                f"({self.slide_crop})",
            ),
            at_least(self, "eval_batch_size", 1),
            one_of(self, "precision", PRECISIONS),
        ])  # fmt: skip


# Values each preset sets; the rest are the dataclass defaults (VOC's recipe).
PRESETS: dict[str, dict[str, Any]] = {
    "voc": {},
    # mmseg's fcn_r50-d8_769x769_40k_cityscapes: batch 8 (4 GPUs x 2), 2048x1024 images
    # resized to fit 2049x1025, logits upsampled with align_corners (769 = 8 x 96 + 1 puts the
    # stride-8 grid on the corners), scored with 769 px sliding windows at stride 513.
    "cityscapes": {
        "iterations": 40000, "batch_size": 8, "crop_size": 769, "scale": [2049, 1025],
        "align_corners": True, "eval_mode": "slide", "slide_crop": 769, "slide_stride": 513,
    },
    # The recipe's shape on the 96 px demo scenes (halved by --scale), sized for well under a
    # minute on two CPU cores. 60 iterations are 0.3% of VOC's schedule, so the step is 5x
    # larger than mmseg's to get past predicting background everywhere.
    "tiny": {
        "iterations": 40, "batch_size": 8, "crop_size": 48, "scale": [48, 48], "lr": 0.05,
        "head_channels": 64, "aux_channels": 32, "eval_batch_size": 8, "workers": 0,
        "buffer_size": 100, "log_every": 10, "checkpoint_every": 20,
    },
}  # fmt: skip
# tiny's shapes for a few iterations: proves the step runs end to end (a new cluster, a
# pipeline test of many arms); its scores mean nothing.
PRESETS["smoke"] = {**PRESETS["tiny"], "iterations": 4, "log_every": 2, "checkpoint_every": 2}


HELP = {
    "backbone": "backbone.pt to finetune (a torchvision ResNet state_dict)",
    "train": "training shards (voc layout): a dataset URI (its train split) or a split URI",
    "val": "evaluation shards (voc layout): a dataset URI (its val split) or a split URI",
    "out": "output URI: metrics.json, train_log.jsonl, checkpoints/",
    "preset": "voc (512 px, 20k it), cityscapes (769 px, 40k it, slide eval), tiny (CPU demo) "
    "or smoke (4 iterations: checks the step runs end to end); "
    "flags override it",
    "arch": "expected backbone arch; the run fails before training if backbone.pt differs",
    "iterations": "training iterations (mmseg's schedules are iteration-based)",
    "batch_size": "global batch over all ranks",
    "crop_size": "square training crop in pixels",
    "scale": "long,short bound of the keep-ratio resize (train and test), e.g. 2048,512",
    "ratio_range": "low,high random resize ratio on top of --scale in training",
    "cat_max_ratio": "redraw crops where one class covers this share of labelled pixels",
    "lr": "initial SGD learning rate",
    "min_lr": "learning rate at the end of the poly decay",
    "power": "exponent of the poly decay",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay (all parameters, as mmseg)",
    "head_channels": "width of the FCN head on res5 (mmseg: 512)",
    "aux_channels": "width of the auxiliary FCN head on res4 (mmseg: 256; 0: none)",
    "aux_weight": "loss weight of the auxiliary head (mmseg: 0.4)",
    "dropout": "Dropout2d rate before the classifiers",
    "align_corners": "bilinear upsampling of logits with align_corners (mmseg: on for 769 px)",
    "eval_mode": "whole-image or sliding-window inference",
    "slide_crop": "window side of sliding-window inference",
    "slide_stride": "step between windows of sliding-window inference",
    "eval_batch_size": "images per evaluation forward pass on each rank (mmseg tests with 1)",
    "precision": "fp32, or bf16 autocast (GPUs)",
    "sync_bn": "synchronise BatchNorm statistics across GPUs (CPU runs keep per-rank BN)",
    "workers": "data-loader processes per rank",
    "buffer_size": "samples in each loader worker's shuffle buffer",
    "seed": "seed of head initialisation, data order and augmentation",
    "log_every": "iterations per log line and train_log.jsonl record",
    "checkpoint_every": "iterations between checkpoints (one is always written at the end)",
    "keep_checkpoints": "newest checkpoints to keep",
}


def _pair(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(part) for part in text.split(",")]
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{text!r}: expected two numbers, a,b") from error
        if len(values) != 2:
            raise argparse.ArgumentTypeError(f"{text!r}: expected two numbers, a,b")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; unset flags stay out of the namespace, so presets apply."""
    pairs = {"scale": _pair(int), "ratio_range": _pair(float)}
    add_config_flags(
        parser, SegmentationConfig, HELP, parsers=pairs, choices={"preset": list(PRESETS)}
    )


def make_config(preset: str = SegmentationConfig.preset, **overrides: Any) -> SegmentationConfig:
    """The ``preset``'s configuration with ``overrides`` applied on top.

    Raises:
        UsageError: An unknown preset.
    """
    return from_preset(SegmentationConfig, PRESETS, preset, preset=preset, **overrides)


def config_from_args(args: argparse.Namespace) -> SegmentationConfig:
    """Merges the defaults, the ``--preset`` and explicit flags.

    Raises:
        UsageError: An unknown preset.
    """
    preset, overrides = preset_and_overrides(args, SegmentationConfig, SegmentationConfig.preset)
    return make_config(preset, **overrides)
