"""The linear-probe configuration: presets, command-line flags and validation.

Precedence: dataclass defaults (the paper's protocol) < ``--preset`` < explicit flags. Every
value is checked before a backbone or a shard is touched.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from ladder_siam.nets.archs import ARCHS, STAGES
from ladder_siam.runtime.flags import add_config_flags
from ladder_siam.runtime.step_config import (
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

PROTOCOLS = ("fast", "standard")

DEFAULT_PRESET = "paper"
# ``tiny`` is for the demo and tests: 32-48 px shards, a couple of CPU cores, seconds per run.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "tiny": {
        "image_size": 32,
        "epochs": 20,
        "batch_size": 32,
        "extract_batch_size": 64,
        "workers": 0,
        "log_every": 10,
        "checkpoint_every": 10,
    },
}


@dataclass
class ProbeConfig:
    """Everything one linear-probe evaluation depends on.

    The defaults are the paper's protocol (section 4.1: SGD, 100 epochs, cosine annealing,
    run with mmselfsup), with mmselfsup's ``sgd_coslr-100e`` schedule for ResNet-50: batch
    256, learning rate 0.3, momentum 0.9; weight decay 0 (mmselfsup's 1e-6 is negligible for a
    linear layer). Evaluation resizes the shorter side to ``image_size / crop_fraction`` (256
    for 224) and centre-crops ``image_size``, as mmselfsup's ImageNet test pipeline does.
    """

    backbone: str = ""
    train: str = ""
    val: str = ""
    out: str = ""
    protocol: str = "fast"
    stages: list[str] | None = None
    arch: str | None = None
    image_size: int = 224
    crop_fraction: float = 0.875
    epochs: int = 100
    batch_size: int = 256
    base_lr: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_norm: bool = True
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_chunk: int = 4096
    extract_batch_size: int = 256
    workers: int = 8
    cache_features: bool = False
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    max_steps: int | None = None

    def probe_stages(self) -> list[str]:
        """The stages to probe, shallowest first.

        Unset, the fast protocol probes all four (Table 7) and the standard one res5 only
        (Table 1), whose training runs the backbone every step.
        """
        if self.stages is None:
            return list(STAGES) if self.protocol == "fast" else ["res5"]
        return sorted(self.stages, key=STAGES.index)

    @property
    def resize_size(self) -> int:
        """The shorter side before the centre crop (256 for a 224 crop)."""
        return round(self.image_size / self.crop_fraction)

    def validate(self, world_size: int = 1) -> None:
        """Raises ``UsageError`` naming the first bad setting."""
        unknown = [stage for stage in self.stages or [] if stage not in STAGES]
        check([
            *required(self, "backbone", "train", "val", "out"),
            one_of(self, "protocol", PROTOCOLS),
            (
                not unknown,
                f"--stages: unknown stage {', '.join(unknown)}; expected some of "
                f"{', '.join(STAGES)}",
            ),
            (self.stages is None or len(self.stages) > 0, "--stages: name at least one stage"),
            (
                self.stages is None or len(set(self.stages)) == len(self.stages),
                f"--stages {','.join(self.stages or [])}: a stage is named twice",
            ),
            one_of(self, "arch", ARCHS),
            at_least(self, "image_size", 16),
            between(self, "crop_fraction", 0, 1, open_low=True),
            at_least(self, "epochs", 1),
            # The heads' batch normalisation needs two samples on each rank; only the standard
            # protocol splits its batch over the ranks (the fast one trains on all features).
            *step_checks(self, world_size, per_rank=2, divisible=self.protocol != "fast"),
            positive(self, "base_lr"),
            between(self, "momentum", 0, 1, open_high=True),
            at_least(self, "weight_decay", 0),
            at_least(self, "knn_k", 1),
            positive(self, "knn_temperature"),
            at_least(self, "knn_chunk", 1),
            at_least(self, "extract_batch_size", 1),
            at_least(self, "max_steps", 1),
        ])  # fmt: skip


HELP = {
    "backbone": "backbone.pt of a pretraining run (a torchvision ResNet state_dict)",
    "train": "labelled training shards (imagefolder layout): a dataset URI (its train split) "
    "or a split URI",
    "val": "labelled validation shards: a dataset URI (its val split) or a split URI",
    "out": "output URI: metrics.json (and checkpoints/ or features/)",
    "protocol": "fast: features extracted once, all stages probed together, plus kNN "
    "(Table 7); standard: res5 trained on random-resized-crop + flip views, the published "
    "protocol (Table 1)",
    "stages": "comma-separated stages to probe (default: res2..res5 for fast, res5 for standard)",
    "arch": "expected architecture; the weights are checked against it",
    "image_size": "crop size in pixels (224 for ImageNet; the demo uses 32-48)",
    "crop_fraction": "evaluation centre crop / resized shorter side (224/256 = 0.875)",
    "epochs": "classifier training epochs (the paper: 100)",
    "batch_size": "global batch of the classifier training (at least 2 per rank: the heads' "
    "batch normalisation needs two samples)",
    "base_lr": "SGD learning rate per 256 samples (lr = base_lr x batch / 256), cosine to 0",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay of the classifiers",
    "batch_norm": "BatchNorm1d without affine parameters before each classifier, as MAE does "
    "for linear probing: it makes one learning rate suit every stage's feature scale",
    "knn_k": "neighbours of the weighted kNN classifier (fast protocol)",
    "knn_temperature": "kNN vote weight exp(similarity / T) (InstDisc, DINO: 0.07)",
    "knn_chunk": "rows per kNN similarity block (memory is chunk x chunk floats)",
    "extract_batch_size": "images per forward pass of the frozen backbone, per rank",
    "workers": "data-loader processes per rank",
    "cache_features": "keep extracted features under OUT/features/ and reuse them on a rerun",
    "seed": "seed of the classifier initialisation and the data order",
    "log_every": "standard protocol: steps per log line and train_log.jsonl record (the fast "
    "protocol writes one per epoch)",
    "checkpoint_every": "standard protocol: steps between checkpoints (and one at the end)",
    "keep_checkpoints": "standard protocol: newest checkpoints to keep",
    "max_steps": "standard protocol: stop after this many steps (smoke tests)",
}


def _stages(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--preset`` and one flag per field; unset flags stay out of the namespace."""
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=DEFAULT_PRESET,
        help="paper: the published protocol (default); tiny: few epochs at 32 px for the "
        "demo and tests; explicit flags override either",
    )
    add_config_flags(
        parser, ProbeConfig, HELP, parsers={"stages": _stages}, choices={"protocol": PROTOCOLS}
    )


def make_config(preset: str = DEFAULT_PRESET, **overrides: Any) -> ProbeConfig:
    """The ``preset``'s configuration with ``overrides`` applied on top.

    Raises:
        UsageError: An unknown preset.
    """
    return from_preset(ProbeConfig, PRESETS, preset, **overrides)


def config_from_args(args: argparse.Namespace) -> ProbeConfig:
    """Merges the defaults, the preset and the explicit flags."""
    preset, overrides = preset_and_overrides(args, ProbeConfig, DEFAULT_PRESET)
    return make_config(preset, **overrides)
