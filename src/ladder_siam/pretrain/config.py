"""The pretraining configuration: defaults, YAML presets, command-line overrides, validation.

Precedence is the usual one: dataclass defaults < ``--config`` YAML preset (or the whole config
as ``--config-json``, as the pipeline's launcher passes it) < explicit flags. Every value is
checked before any work starts, so a typo fails in a second rather than after the GPUs were
requested.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from ladder_siam.errors import UsageError
from ladder_siam.io import storage
from ladder_siam.nets.archs import ARCHS
from ladder_siam.pretrain.levels import ladder_weights, parse_levels
from ladder_siam.runtime.flags import add_config_flags, explicit_flags
from ladder_siam.runtime.step_config import (
    PRECISIONS,
    at_least,
    between,
    check,
    expected,
    one_of,
    positive,
    required,
    step_checks,
)
from ladder_siam.runtime.typed_config import check_fields

DECODERS = ("cpu", "gpu")
SYNC_BN_SCOPES = ("all", "node")
# The presets ship inside the package (pyproject.toml's package-data), so that a name resolves
# from any folder and in the image, where the repository itself is not.
PRESET_FOLDER = resources.files("ladder_siam.pretrain") / "presets"
PRESET_SUFFIX = ".yaml"


@dataclass
class PretrainConfig:
    """Everything one pretraining run depends on (stored in every checkpoint).

    The defaults are the paper's recipe (BYOL's, for ResNet-50 on ImageNet) except the batch:
    the paper used 4096 over 64 GPUs; 256 fits one node and the learning rate follows it.
    """

    shards: str = ""
    out: str = ""
    method: str = "ladder-byol"
    weights: list[float] | None = None
    w: float = 0.5
    arch: str = "resnet50"
    small_input: bool = False
    image_size: int = 224
    epochs: int = 200
    batch_size: int = 256
    accumulation: int = 1
    base_lr: float = 0.45
    weight_decay: float = 1e-6
    warmup_epochs: float = 10.0
    tau_base: float = 0.99
    lars_eta: float = 1e-3
    hidden_dim: int = 4096
    projection_dim: int = 256
    dense_dim: int = 128
    precision: str = "bf16"
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False
    sync_bn_scope: str = "all"
    workers: int = 8
    decode: str = "cpu"
    buffer_size: int = 1000
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_steps: int | None = None
    metrics_port: int | None = 9400
    collapse_threshold: float = 1e-3
    collapse_patience: int = 3
    online_monitor: bool = True
    online_probe_lr: float = 0.1
    rank_every: int = 100

    @property
    def levels(self) -> str:
        """Loss kind per stage res2..res5, from ``method`` (a name or a level string)."""
        return parse_levels(self.method)

    def stage_weights(self) -> list[float]:
        """Loss weight per stage res2..res5: explicit ``weights`` or Eq. 6 with ``w``."""
        return list(self.weights) if self.weights is not None else ladder_weights(self.w, 4)

    def validate(self, world_size: int = 1) -> None:
        """Raises ``UsageError`` naming the first bad setting."""
        self.levels  # noqa: B018 - parse_levels raises on a bad method
        check([
            *required(self, "shards", "out"),
            one_of(self, "arch", ARCHS),
            one_of(self, "precision", PRECISIONS),
            one_of(self, "decode", DECODERS),
            at_least(self, "image_size", 16),
            at_least(self, "epochs", 1),
            at_least(self, "accumulation", 1),
            *step_checks(self, world_size, accumulation=self.accumulation),
            positive(self, "base_lr"),
            at_least(self, "weight_decay", 0),
            between(self, "tau_base", 0, 1),
            at_least(self, "warmup_epochs", 0),
            at_least(self, "max_steps", 1),
            (
                self.metrics_port is None or 1 <= self.metrics_port <= 65535,
                f"--metrics-port {self.metrics_port}: must be a port in 1..65535, or 0 for off",
            ),
            one_of(self, "sync_bn_scope", SYNC_BN_SCOPES),
            positive(self, "online_probe_lr"),
            at_least(self, "rank_every", 1),
            (
                self.weights is None or (len(self.weights) == 4 and min(self.weights) >= 0),
                f"--weights {self.weights}: must be four non-negative numbers for res2..res5",
            ),
        ])  # fmt: skip


def preset_names() -> list[str]:
    """The presets that ship with the package, by name (``tiny_cpu``, ...)."""
    return sorted(
        entry.name.removesuffix(PRESET_SUFFIX)
        for entry in PRESET_FOLDER.iterdir()
        if entry.name.endswith(PRESET_SUFFIX)
    )


def resolve_preset(preset: str, flag: str = "--config") -> str:
    """The file of a preset: a packaged preset's name first, else a path or URI.

    Args:
        preset: A packaged preset's name, with or without ``.yaml`` (``tiny_cpu``), or the
            path (absolute or relative to the working folder) or URI of a YAML file.
        flag: Names the setting in the error message.

    Raises:
        UsageError: ``preset`` is neither (the message lists the packaged presets).
    """
    name = preset.removesuffix(PRESET_SUFFIX)
    if name in preset_names():
        return str(PRESET_FOLDER / f"{name}{PRESET_SUFFIX}")
    if storage.exists(preset):
        return preset
    raise UsageError(f"{expected(flag, preset, preset_names())}, or a YAML file's path")


def load_preset(uri: str) -> dict[str, Any]:
    """Reads a YAML preset, checking each key and value against :class:`PretrainConfig`.

    Raises:
        UsageError: Not YAML, not a mapping, an unknown setting or a mistyped value (each
            message names the file).
    """
    try:
        data = yaml.safe_load(storage.read_text(uri)) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"{uri}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise UsageError(f"{uri}: expected a mapping of settings")
    return check_fields(PretrainConfig, data, uri)


def make_config(preset: str | None = None, **overrides: Any) -> PretrainConfig:
    """The defaults, then the YAML ``preset`` if any, then ``overrides``.

    Args:
        preset: A packaged preset's name, or a YAML file's path or URI (see
            :func:`resolve_preset`).
        **overrides: Field values that replace the preset's.

    Raises:
        UsageError: No such preset, or it cannot be read or holds a bad setting.
    """
    values = load_preset(resolve_preset(preset)) if preset else {}
    values.update(overrides)
    if values.get("metrics_port") == 0:  # 0 on the command line turns metrics off
        values["metrics_port"] = None
    return dataclasses.replace(PretrainConfig(), **values)


def _parse_weights(text: str) -> list[float]:
    try:
        values = [float(parse_fraction(part)) for part in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: expected e.g. 1/16,1/8,1/4,1") from error
    return values


def parse_fraction(text: str) -> float:
    """Parses ``0.25`` or ``1/4``."""
    numerator, _, denominator = text.strip().partition("/")
    return float(numerator) / float(denominator) if denominator else float(numerator)


# flag help texts; every field of PretrainConfig is a flag
HELP = {
    "shards": "training shards: a dataset URI (its train split) or a split URI",
    "out": "run output URI: checkpoints/, backbone.pt, train_log.jsonl",
    "method": "byol, ladder-byol, dense-byol, ladder-dense-byol, or levels like DDGG "
    "(G global, D dense, - none; res2..res5)",
    "weights": "loss weights res2..res5, e.g. 1/16,1/8,1/4,1 (default: Eq. 6 with --w)",
    "w": "Eq. 6 coefficient: weights 2^(i-N) w below the top, 1 at the top",
    "arch": "torchvision ResNet",
    "small_input": "3x3 stem without max-pool, for 32-64 px images",
    "image_size": "training crop size in pixels",
    "epochs": "epochs over the manifest's sample count",
    "batch_size": "global batch over all GPUs and accumulation steps",
    "accumulation": "micro-batches per optimizer step (reach a large global batch on few GPUs)",
    "base_lr": "LARS learning rate per 256 images (lr = base_lr x batch / 256; BYOL: 0.45)",
    "weight_decay": "weight decay (biases and norm parameters excluded)",
    "warmup_epochs": "linear warm-up before the cosine decay",
    "tau_base": "initial EMA rate of the target (cosine schedule to 1)",
    "lars_eta": "LARS trust coefficient",
    "hidden_dim": "hidden width of the global heads",
    "projection_dim": "output width of the global heads",
    "dense_dim": "output width of the dense heads",
    "precision": "fp32, or bf16 autocast (GPUs)",
    "channels_last": "NHWC memory format (faster convolutions on tensor cores)",
    "compile": "torch.compile the training step",
    "sync_bn": "synchronise BatchNorm statistics across GPUs (BYOL's cross-replica BN; CPU "
    "runs keep per-process BN: PyTorch's SyncBatchNorm needs GPUs)",
    "sync_bn_scope": "ranks that share SyncBN statistics: all (BYOL's cross-replica BN) or node "
    "(each pod's GPUs: the ~360 small collectives per step stay on NVLink instead of the "
    "network; see BENCHMARKS.md, multi-node scaling)",
    "workers": "data-loader processes per GPU",
    "decode": "where JPEGs are decoded: cpu (loader workers decode and crop; reduced-size "
    "decoding) or gpu (workers only draw the crops; the training device decodes the batch "
    "with nvjpeg and crops it: for when the CPU cores cannot keep the GPU busy)",
    "buffer_size": "samples in each loader worker's shuffle buffer",
    "seed": "seed of initialisation, data order and augmentation",
    "log_every": "steps per log line / train_log.jsonl entry / metrics update",
    "checkpoint_every": "steps between checkpoints (one is always written at the end)",
    "keep_checkpoints": "newest checkpoints to keep",
    "max_steps": "stop after this many optimizer steps (smoke tests, benchmarks)",
    "metrics_port": "Prometheus /metrics port on local rank 0 (0 or empty: off)",
    "collapse_threshold": "output std below which a level counts as collapsing",
    "collapse_patience": "log intervals below the threshold before a collapse warning",
    "online_monitor": "train a linear probe on every stage's detached features during "
    "pretraining and compute RankMe per stage (needs labelled shards; without .cls labels "
    "it is off with a log line); training itself is unchanged",
    "online_probe_lr": "learning rate of the online probes' own SGD",
    "rank_every": "steps between RankMe computations (over the last max-stage-width samples)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--config`` and one flag per field; unset flags stay out of the namespace."""
    parser.add_argument(
        "--config",
        help=f"preset: one of {', '.join(preset_names())} (shipped with the package), or a "
        "YAML file's path or URI; flags override it",
    )
    parser.add_argument(
        "--config-json",
        help="the whole config as a JSON object, as the pipeline's launcher passes it to every "
        "training pod (settings resolved once, before any GPU is requested); flags override it",
    )
    parser.add_argument(
        "--levels", dest="method", default=argparse.SUPPRESS,
        help="loss kinds res2..res5 as a string like DDGG (an alternative to --method)",
    )  # fmt: skip
    add_config_flags(parser, PretrainConfig, HELP, parsers={"weights": _parse_weights})


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """Merges defaults, the ``--config`` preset or ``--config-json``, and explicit flags.

    Raises:
        UsageError: Both ``--config`` and ``--config-json``, no such preset, or a bad setting.
    """
    overrides = explicit_flags(args, PretrainConfig)
    config_json = getattr(args, "config_json", None)
    if config_json is None:
        return make_config(getattr(args, "config", None), **overrides)
    if getattr(args, "config", None):
        raise UsageError("--config and --config-json: give one of them")
    try:
        data = json.loads(config_json)
    except json.JSONDecodeError as error:
        raise UsageError(f"--config-json: not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise UsageError("--config-json: expected a JSON object of settings")
    return make_config(None, **{**check_fields(PretrainConfig, data, "--config-json"), **overrides})
