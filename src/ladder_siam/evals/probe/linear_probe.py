"""``ladder-siam linear-probe``: linear and kNN classification of a frozen backbone's stages.

Two protocols (see ``--protocol``):

* ``fast`` (default; the paper's Table 7): the pooled features of every requested stage are
  extracted once per split, every stage's linear classifier is trained on them in one pass,
  and a weighted kNN classifier (k = 20, T = 0.07) is evaluated on the same features.
* ``standard`` (Table 1): res5's classifier is trained on random-resized-crop and flip views,
  the backbone running every step (:mod:`ladder_siam.evals.probe.standard`); it checkpoints.

Writes ``OUT/metrics.json``; run with ``ladder-siam linear-probe`` or ``torchrun -m
ladder_siam.evals.probe.linear_probe``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
from typing import Any

import torch

from ladder_siam.data.manifest import ManifestError, SplitManifest, load_split
from ladder_siam.evals.probe.config import ProbeConfig, add_arguments, config_from_args
from ladder_siam.evals.probe.features import (
    EvalTransform,
    FeatureSet,
    PooledStages,
    extract_features,
)
from ladder_siam.evals.probe.heads import evaluate_heads, train_heads
from ladder_siam.evals.probe.knn import knn_correct
from ladder_siam.evals.probe.standard import run_standard
from ladder_siam.io import storage
from ladder_siam.nets.backbone_file import BackboneInfo, load_backbone
from ladder_siam.runtime import distributed, resume, tracking
from ladder_siam.runtime.metrics import push_job_metrics
from ladder_siam.runtime.optim import scaled_lr
from ladder_siam.runtime.per_image import PerImage, order_digest, write_per_image
from ladder_siam.runtime.run_folder import metrics_uri, run_of
from ladder_siam.runtime.train_log import TrainLog

logger = logging.getLogger(__name__)


def load_split_checked(uri: str, split: str, minimum: int) -> SplitManifest:
    """A labelled (imagefolder-layout) split with at least ``minimum`` samples.

    Raises:
        ManifestError: No manifest, the wrong layout, or too few samples.
    """
    manifest = load_split(uri, split)
    manifest.require_layout("imagefolder")
    if manifest.num_samples < minimum:
        raise ManifestError(
            f"{uri}: {manifest.num_samples} samples; the probe needs at least {minimum}"
        )
    return manifest


def _cache_uri(config: ProbeConfig, manifest: SplitManifest) -> str:
    return storage.join(config.out, "features", f"{manifest.split}.pt")


def _cache_key(config: ProbeConfig, backbone: PooledStages, manifest: SplitManifest) -> dict:
    return {
        "backbone_sha256": resume.fingerprint(config.backbone),
        "split": manifest.location,
        "num_samples": manifest.num_samples,
        "stages": list(backbone.stages),
        "image_size": config.image_size,
        "resize_size": config.resize_size,
    }


def _features(
    config: ProbeConfig,
    env: distributed.DistributedEnv,
    backbone: PooledStages,
    manifest: SplitManifest,
    cache_uri: str | None,
) -> FeatureSet:
    """The split's features: from the cache when it matches, else extracted (and cached)."""
    key = _cache_key(config, backbone, manifest) if config.cache_features else None
    if cache_uri is not None:
        stored = torch.load(
            io.BytesIO(storage.read_bytes(cache_uri)), map_location=env.device, weights_only=True
        )
        if stored["key"] == key:
            logger.info("features of %s read from %s", manifest.location, cache_uri)
            return FeatureSet(stored["features"], stored["labels"])
        logger.info("%s holds features of other settings; extracting again", cache_uri)
    transform = EvalTransform(config.image_size, config.resize_size)
    features = extract_features(
        backbone, manifest, transform, config.extract_batch_size, config.workers, env.device,
        report=env.is_main,
    )  # fmt: skip
    if config.cache_features and env.is_main:
        with storage.atomic_write(_cache_uri(config, manifest)) as stream:
            torch.save({"key": key, **vars(features)}, stream)
    return features


def run_fast(
    config: ProbeConfig,
    env: distributed.DistributedEnv,
    backbone: PooledStages,
    train: SplitManifest,
    val: SplitManifest,
) -> dict[str, dict[str, Any]]:
    """Extracts features once, trains all stages' heads and runs kNN; results on rank 0.

    Every rank extracts its share; rank 0 then trains and evaluates on the gathered features
    (the classifiers are cheap next to the extraction) and the other ranks return ``{}``.
    """
    # Every rank looks for both caches before any collective (rank 0 writes them after the
    # gathers), so all ranks take the same path through extract_features' gathers.
    cached = [
        _cache_uri(config, split)
        if config.cache_features and storage.exists(_cache_uri(config, split))
        else None
        for split in (train, val)
    ]
    train_set = _features(config, env, backbone, train, cached[0])
    val_set = _features(config, env, backbone, val, cached[1])
    if not env.is_main:
        return {}
    num_classes = len(train.classes)
    heads = train_heads(
        train_set.features, train_set.labels, num_classes, epochs=config.epochs,
        batch_size=config.batch_size, lr=scaled_lr(config.base_lr, config.batch_size),
        momentum=config.momentum, weight_decay=config.weight_decay,
        batch_norm=config.batch_norm, seed=config.seed, train_log=TrainLog(config.out, None),
    )  # fmt: skip
    results = evaluate_heads(heads, val_set.features, val_set.labels)
    for stage, result in results.items():
        correct = knn_correct(
            train_set.features[stage], train_set.labels, val_set.features[stage],
            val_set.labels, num_classes, config.knn_k, config.knn_temperature, config.knn_chunk,
        ).cpu()  # fmt: skip
        result["knn_top1"] = 100.0 * correct.float().mean().item()
        result["knn_correct"] = correct
    write_per_image(config.out, per_image_evidence(results, val_set.labels, val))
    return results


def per_image_evidence(
    results: dict[str, dict[str, Any]], labels: torch.Tensor, val: SplitManifest
) -> PerImage:
    """Which val images each stage's probe and kNN got right, keyed like the scalars.

    The images are identified by the val shards' checksums and the labels in reading order.
    """
    correct = {}
    for stage, result in results.items():
        correct[f"probe_top1_{stage}"] = result["correct"].numpy()
        if "knn_correct" in result:
            correct[f"knn_top1_{stage}"] = result["knn_correct"].numpy()
    order = order_digest(labels.cpu().numpy(), *(shard.sha256 for shard in val.shards))
    return PerImage(order, len(labels), correct)


def build_metrics(
    config: ProbeConfig,
    info: BackboneInfo,
    results: dict[str, dict[str, Any]],
    train: SplitManifest,
    val: SplitManifest,
) -> dict[str, Any]:
    """The ``metrics.json`` document: stage results, ``scalars`` for KFP, confusion matrices."""
    scalars: dict[str, float] = {}
    # The confusion matrices go beside the stages' numbers, which stay flat for the report.
    per_image = ("confusion", "correct", "knn_correct")
    stages = {
        stage: {key: value for key, value in result.items() if key not in per_image}
        for stage, result in results.items()
    }
    confusion = {stage: r["confusion"] for stage, r in results.items() if "confusion" in r}
    for stage, result in stages.items():
        scalars[f"probe_top1_{stage}"] = result["top1"]
        scalars[f"probe_top5_{stage}"] = result["top5"]
        if "knn_top1" in result:
            scalars[f"knn_top1_{stage}"] = result["knn_top1"]
    # The headline numbers are the deepest probed stage's (res5 unless --stages omits it).
    top = list(stages)[-1]
    scalars["probe_top1"] = stages[top]["top1"]
    if "knn_top1" in stages[top]:
        scalars["knn_top1"] = stages[top]["knn_top1"]
    return {
        "protocol": config.protocol,
        "arch": info.arch,
        "small_input": info.small_input,
        "stages": stages,
        "scalars": scalars,
        "confusion": confusion,
        "num_train": train.num_samples,
        "num_val": val.num_samples,
        "classes": train.classes,
        "config": dataclasses.asdict(config),
    }


def linear_probe(config: ProbeConfig) -> dict[str, Any]:
    """Evaluates a backbone by linear probing (and kNN) per stage; writes ``metrics.json``.

    Every input is checked before any work: the settings, both splits (labelled shards of
    the imagefolder layout, the same classes) and the backbone's weights.

    Args:
        config: The evaluation; see :class:`ProbeConfig`.

    Returns:
        The ``metrics.json`` document (on rank 0; other ranks get ``{}``).

    Raises:
        ValueError: A bad setting, unlabelled shards, classes that differ between the splits
            or an unloadable backbone (``ManifestError`` is a ``ValueError``).
    """
    env = distributed.setup()
    try:
        config.validate(env.world_size)
        train = load_split_checked(config.train, "train", minimum=2)
        val = load_split_checked(config.val, "val", minimum=1)
        if train.classes != val.classes:
            raise ManifestError(
                f"{config.train} and {config.val}: different classes "
                f"({len(train.classes)} vs {len(val.classes)}); probe splits of one dataset"
            )
        resnet, info = load_backbone(config.backbone, config.arch)
        backbone = PooledStages(resnet, config.probe_stages()).to(env.device)
        if env.is_main:
            logger.info(
                "%s linear probe of %s (%s) on %d train / %d val images, %d classes",
                config.protocol, info.arch, ",".join(backbone.stages), train.num_samples,
                val.num_samples, len(train.classes),
            )  # fmt: skip
        protocol = run_fast if config.protocol == "fast" else run_standard
        results = protocol(config, env, backbone, train, val)
        if not env.is_main:
            return {}
        metrics = build_metrics(config, info, results, train, val)
        storage.write_text(metrics_uri(config.out), json.dumps(metrics, indent=2) + "\n")
        # Prometheus wants base units: accuracies are pushed as ratios.
        push_job_metrics(
            "linear-probe",
            {f"{name}_ratio": value / 100 for name, value in metrics["scalars"].items()},
            run=run_of(config.out),
        )
        tracking.log_scalars("linear-probe", metrics["scalars"], dataclasses.asdict(config))
        logger.info(
            "linear probe: %s",
            " ".join(f"{stage} {r['top1']:.2f}%" for stage, r in results.items()),
        )
        return metrics
    finally:
        distributed.cleanup()


def get_args_parser() -> argparse.ArgumentParser:
    """Options of ``ladder-siam linear-probe`` (every field of :class:`ProbeConfig`)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> None:
    """Runs ``linear_probe`` from parsed arguments."""
    linear_probe(config_from_args(args))


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    main(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args())
