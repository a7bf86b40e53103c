"""Mask R-CNN finetune: COCO evaluation, targets and flips, end-to-end runs and resume."""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from backbones import reexport
from pycocotools import mask as mask_utils
from system_tools import require_tool
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, masks_to_boxes

from ladder_siam.data.manifest import ManifestError, load_split
from ladder_siam.data.shards import DecodedSample, decode_sample, read_shard
from ladder_siam.evals.detection import finetune as detection_finetune
from ladder_siam.evals.detection.coco_eval import ImageDetections, coco_evaluate
from ladder_siam.evals.detection.config import DetectionConfig, config_from_args, make_config
from ladder_siam.evals.detection.data import TrainTransform, instance_targets
from ladder_siam.evals.detection.finetune import finetune_detection, get_args_parser
from ladder_siam.evals.detection.model import build_mask_rcnn, param_groups
from ladder_siam.kube.evaluation_jobs import evaluation_args, run_evaluation
from ladder_siam.kube.launch_config import LaunchConfig, task_config
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.pretrain.model import LadderSiam
from ladder_siam.runtime.health import NonFiniteLossError
from ladder_siam.runtime.resume import ResumeError
from ladder_siam.runtime.train_log import read_train_log

CLASSES = ["a", "b"]
# Non-contiguous COCO ids: a prediction scored under its contiguous label would miss.
CATEGORY_IDS = {0: 7, 1: 3}
SIZE = 64


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Four test runs share this machine's two cores; with two intra-op threads each, OpenMP
    # barriers wait on descheduled threads and the runs here take ten times longer.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rectangle(x: int, y: int, w: int, h: int, category: int) -> dict:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8, order="F")
    mask[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(mask)
    return {
        "bbox": [float(x), float(y), float(w), float(h)],
        "category": category,
        "category_id": CATEGORY_IDS[category],
        "iscrowd": 0,
        "area": float(w * h),
        "segmentation": {"size": [SIZE, SIZE], "counts": rle["counts"].decode()},
    }


def records() -> list[dict]:
    """Three images: small (20 px) and medium (40 px) squares of both classes."""
    layouts = [
        [rectangle(2, 2, 20, 20, 0), rectangle(30, 30, 20, 20, 1)],
        [rectangle(10, 5, 40, 40, 1)],
        [rectangle(0, 40, 20, 20, 0), rectangle(20, 0, 40, 40, 0)],
    ]
    return [
        {"image_id": 100 + i, "width": SIZE, "height": SIZE, "instances": instances}
        for i, instances in enumerate(layouts)
    ]


def predictions(shift: float = 0.0, label_offset: int = 0) -> list[ImageDetections]:
    """The ground truth as Mask R-CNN output, moved right by ``shift`` x the box width."""
    detections = []
    for record in records():
        target = instance_targets(record, SIZE, SIZE)
        boxes, masks = target["boxes"].clone(), target["masks"].float()
        for index, width in enumerate((boxes[:, 2] - boxes[:, 0]).int().tolist()):
            dx = int(shift * width)
            boxes[index, [0, 2]] += dx
            masks[index] = torch.roll(masks[index], dx, dims=1)
        output = {
            "boxes": boxes,
            "scores": torch.ones(len(boxes)),
            "labels": (target["labels"] - 1 + label_offset) % len(CLASSES) + 1,
            "masks": masks[:, None] * 0.9,
        }
        detections.append(ImageDetections.from_output(record["image_id"], output))
    return detections


def test_ground_truth_as_prediction_scores_100() -> None:
    results = coco_evaluate(records(), predictions(), CLASSES)
    for iou_type in ("bbox", "segm"):
        assert results[iou_type] == pytest.approx(
            {"AP": 100.0, "AP50": 100.0, "AP75": 100.0, "APs": 100.0, "APm": 100.0, "APl": None}
        )


def test_shifted_predictions_score_less() -> None:
    # A shift of a fifth of the width leaves IoU 0.8 / 1.2 = 0.667: a match at the IoU
    # thresholds 0.50-0.65 (4 of 10) and a miss from 0.70 on.
    results = coco_evaluate(records(), predictions(shift=0.2), CLASSES)
    for iou_type in ("bbox", "segm"):
        ap = results[iou_type]
        assert ap["AP50"] == 100.0 and ap["AP75"] == 0.0
        assert ap["AP"] == pytest.approx(40.0)


def test_wrong_class_scores_zero_and_no_predictions_too() -> None:
    for detections in (predictions(label_offset=1), []):
        results = coco_evaluate(records(), detections, CLASSES)
        for iou_type in ("bbox", "segm"):
            assert results[iou_type]["AP"] == 0.0 and results[iou_type]["AP50"] == 0.0
            assert results[iou_type]["APl"] is None


def test_evaluation_rejects_unknown_images_and_empty_ground_truth() -> None:
    stray = ImageDetections(999, np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), [])
    with pytest.raises(ValueError, match=r"images not in the ground truth: \[999\]"):
        coco_evaluate(records(), [stray], CLASSES)
    empty = [{"image_id": 1, "width": SIZE, "height": SIZE, "instances": []}]
    with pytest.raises(ValueError, match="no annotated instances"):
        coco_evaluate(empty, [], CLASSES)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("detection")
    make_demo_data(str(root / "raw"), images=36, size=SIZE, val_fraction=0.25)
    prepare_shards(str(root / "raw" / "coco"), str(root / "coco"), layout="coco", shard_size=10)
    prepare_shards(str(root / "raw" / "imagefolder"), str(root / "folder"), shard_size=10)
    state = LadderSiam(
        "resnet18", "---G", hidden_dim=16, projection_dim=8, small_input=True
    ).backbone_state_dict()
    torch.save(state, root / "backbone.pt")
    return root


def demo_samples(demo: Path) -> list[DecodedSample]:
    uri = load_split(str(demo / "coco"), "train").shard_uris()[0]
    return [decode_sample(sample) for sample in read_shard(uri)]


def test_flip_keeps_boxes_and_masks_consistent(demo: Path) -> None:
    flipped_any = False
    for sample in demo_samples(demo):
        image, target = TrainTransform(flip_prob=0.0)(sample)
        flipped_image, flipped = TrainTransform(flip_prob=1.0)(sample)
        assert torch.equal(flipped_image, image.flip(-1))
        assert torch.equal(flipped["labels"], target["labels"])
        labels = [i["category"] + 1 for i in sample.instances["instances"]]
        assert target["labels"].tolist() == labels and target["masks"].dtype == torch.uint8
        for boxes, masks in (
            (target["boxes"], target["masks"]),
            (flipped["boxes"], flipped["masks"]),
        ):
            # Demo boxes are the visible pixels' extent, ends exclusive.
            assert torch.equal(masks_to_boxes(masks) + torch.tensor([0, 0, 1, 1]), boxes)
        flipped_any |= not torch.equal(flipped["boxes"], target["boxes"])
    assert flipped_any


def test_crowds_and_degenerate_boxes_are_left_out_of_training_targets(demo: Path) -> None:
    sample = demo_samples(demo)[0]
    record = sample.instances
    crowd = {**record["instances"][0], "iscrowd": 1}
    flat = {**record["instances"][0], "bbox": [3.0, 4.0, 0.0, 5.0]}
    target = instance_targets({**record, "instances": [crowd, flat]}, SIZE, SIZE)
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, SIZE, SIZE)
    no_mask = {**record["instances"][0], "segmentation": None, "bbox": [3.0, 4.0, 10.0, 5.0]}
    mask = instance_targets({**record, "instances": [no_mask]}, SIZE, SIZE)["masks"][0]
    assert mask.sum() == 50 and mask[4:9, 3:13].all()
    with pytest.raises(ValueError, match="no instance annotations"):
        TrainTransform()(DecodedSample("k", sample.image, label=1))


def test_presets_flags_and_schedule() -> None:
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    coco = config_from_args(parser.parse_args([]))
    assert (coco.iterations, coco.batch_size, coco.lr, coco.lr_steps) == (
        90_000, 16, 0.02, (60_000, 80_000),
    )  # fmt: skip
    assert (coco.min_size, coco.max_size) == (800, 1333)
    assert coco.lr_factor(0) == pytest.approx(0.001) and coco.lr_factor(1000) == 1.0
    assert coco.lr_factor(60_000) == pytest.approx(0.1)
    assert coco.lr_factor(89_999) == pytest.approx(0.01)
    tiny = config_from_args(
        parser.parse_args(["--preset", "tiny", "--lr-steps", "5,8", "--batch-size", "8"])
    )
    assert (tiny.preset, tiny.lr_steps, tiny.min_size, tiny.lr) == ("tiny", (5, 8), 64, 0.04)
    with pytest.raises(ValueError, match="one size per FPN level"):
        make_config(
            "tiny", backbone="b.pt", train="t", val="v", out="o", anchor_sizes=(8, 16)
        ).validate()
    with pytest.raises(SystemExit):
        parser.parse_args(["--preset", "huge"])


def test_model_trains_every_backbone_stage_with_batchnorm() -> None:
    model = build_mask_rcnn(torchvision.models.resnet18(), 7, make_config("tiny"))
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert model.roi_heads.box_predictor.cls_score.out_features == 7
    for part in (model.backbone.fpn, model.roi_heads.box_head, model.roi_heads.mask_head):
        assert any(isinstance(m, nn.BatchNorm2d) for m in part.modules())
    decayed, norm = param_groups(model, 1e-4)
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    }
    assert {id(p) for p in norm["params"]} == norm_params and norm["weight_decay"] == 0.0
    assert len(decayed["params"]) + len(norm_params) == len(list(model.parameters()))
    model.eval()
    with torch.no_grad():
        (output,) = model([torch.rand(3, 48, 80)])
    assert output["masks"].shape[1:] == (1, 48, 80)


def tiny_config(demo: Path, out: Path, **overrides: object) -> DetectionConfig:
    settings = {
        "backbone": str(demo / "backbone.pt"), "train": str(demo / "coco"),
        "val": str(demo / "coco"), "out": str(out), "iterations": 4, "batch_size": 2,
        "log_every": 2, "checkpoint_every": 2, "keep_checkpoints": 3, "workers": 0,
        # Half the demo size: a quarter of the compute, and AP is not what is tested here.
        "min_size": 32, "max_size": 32,
    }  # fmt: skip
    return make_config("tiny", **{**settings, **overrides})


@pytest.mark.slow
def test_finetune_writes_metrics_and_resumes_at_the_checkpoint(
    demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    metrics = finetune_detection(tiny_config(demo, out))
    written = json.loads((out / "metrics.json").read_text())
    assert written == metrics
    assert set(written) == {
        "preset", "arch", "small_input", "bbox", "segm", "iterations", "val_images", "scalars",
    }  # fmt: skip
    assert written["val_images"] == load_split(str(demo / "coco"), "val").num_samples
    assert (written["preset"], written["arch"], written["iterations"]) == ("tiny", "resnet18", 4)
    for iou_type in ("bbox", "segm"):
        assert set(written[iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert 0.0 <= written[iou_type]["AP"] <= written[iou_type]["AP50"] <= 100.0
    assert set(written["scalars"]) == {"box_AP", "box_AP50", "mask_AP", "mask_AP50"}
    assert written["scalars"]["mask_AP"] == written["segm"]["AP"]

    # Lose the last checkpoint and the metrics: the rerun continues from step 2.
    final = out / "checkpoints" / "step-000004.pt"
    uninterrupted = torch.load(io.BytesIO(final.read_bytes()), weights_only=True)["model"]
    final.unlink()
    (out / "metrics.json").unlink()
    with caplog.at_level(logging.INFO, logger="ladder_siam"):
        resumed = finetune_detection(tiny_config(demo, out))
    assert "(step 2)" in caplog.text and resumed["iterations"] == 4
    again = torch.load(io.BytesIO(final.read_bytes()), weights_only=True)["model"]
    for name, tensor in uninterrupted.items():
        assert torch.equal(again[name], tensor), name
    # The log keeps the first run's record of step 2 and the rerun's of step 4, no duplicate.
    log = read_train_log(str(out))
    assert [record["step"] for record in log] == [2, 4]
    assert all(math.isfinite(record["loss_mask"]) and record["lr"] > 0 for record in log)

    with pytest.raises(ResumeError, match=r"cannot resume from step 4.*base_lr: 0.08 -> 0.1"):
        finetune_detection(tiny_config(demo, out, base_lr=0.1))


def test_a_re_exported_backbone_does_not_resume_the_old_finetune(
    demo: Path, tmp_path: Path
) -> None:
    backbone = tmp_path / "backbone.pt"
    shutil.copy(demo / "backbone.pt", backbone)
    config = tiny_config(demo, tmp_path / "run", backbone=str(backbone), iterations=1)
    finetune_detection(config)
    reexport(backbone)  # same path, new bytes: the checkpoint was trained from the old ones
    with pytest.raises(ResumeError, match="backbone changed since the checkpoint"):
        finetune_detection(config)


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_finetune_within_one_interval(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def poisoned(*args: object, **kwargs: object) -> nn.Module:
        """The real model, whose mask loss turns NaN in its third training step."""
        model = build_mask_rcnn(*args, **kwargs)
        steps = []

        def nan_mask_loss(module: nn.Module, inputs: object, losses: dict) -> dict:
            steps.append(1)
            return (
                {**losses, "loss_mask": losses["loss_mask"] * math.nan}
                if len(steps) == 3
                else losses
            )

        model.register_forward_hook(nan_mask_loss)
        return model

    monkeypatch.setattr(detection_finetune, "build_mask_rcnn", poisoned)
    out = tmp_path / "run"
    with pytest.raises(
        NonFiniteLossError,
        match=r"^detection finetune: non-finite loss in step 3: loss_mask = nan$",
    ):
        finetune_detection(tiny_config(demo, out))
    # Stopped at step 4's check, before its checkpoint; no metrics.
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["step-000002.pt"]
    assert [record["step"] for record in read_train_log(str(out))] == [2]
    assert not (out / "metrics.json").exists()


def test_bad_inputs_fail_before_training(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ManifestError, match="needs coco shards"):
        finetune_detection(tiny_config(demo, out, train=str(demo / "folder")))
    with pytest.raises(ManifestError, match="needs coco shards"):
        finetune_detection(tiny_config(demo, out, val=str(demo / "folder")))
    with pytest.raises(ValueError, match="is a resnet18, but resnet50 was requested"):
        finetune_detection(tiny_config(demo, out, arch="resnet50"))
    with pytest.raises(ValueError, match="--batch-size"):
        finetune_detection(tiny_config(demo, out, batch_size=0))
    assert not out.exists()


@pytest.mark.integration
@pytest.mark.slow
def test_a_two_process_local_job_trains_and_scores_as_one_process_does(
    demo: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_tool(str(Path(sys.executable).parent / "torchrun"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "eval"
    args = evaluation_args("tiny", str(demo / "backbone.pt"), str(demo / "coco"),
                           str(demo / "coco"), str(out))  # fmt: skip
    args += ["--iterations", "2", "--batch-size", "4", "--min-size", "32", "--max-size", "32",
             "--workers", "0", "--log-every", "1", "--checkpoint-every", "2",
             # One image per forward pass on either side: a batch's composition changes the
             # kernels' float rounding, which can flip an untrained model's NMS and top-k.
             "--eval-batch-size", "1"]  # fmt: skip
    arm = LaunchConfig(
        name="ladder-siam-r-byol-s0", namespace="local", image="ladder-siam:0.1.0", run_id="r",
        arm="byol-s0", gpus_per_node=8,
    )  # fmt: skip
    # The pipeline's local backend: two processes under torchrun (gloo), 2 images each.
    both = run_evaluation("detection", args, 2, arm, "local")
    log = capfd.readouterr().err
    val_images = load_split(str(demo / "coco"), "val").num_samples
    assert "on 2 x cpu" in log
    assert (both["iterations"], both["val_images"]) == (2, val_images)
    # Rank 0 scores the gathered detections once: no image counted twice, none left out.
    assert log.count(f"COCO segm evaluation of {val_images} images") == 1
    # The global batch and its schedule are the preset's, whatever the process count.
    config = task_config("detection", args)
    assert [(r["step"], r["lr"]) for r in read_train_log(str(out))] == [
        (step, pytest.approx(config.lr * config.lr_factor(step - 1))) for step in (1, 2)
    ]

    # One process, here in the step, resumes at the last step and scores the same weights:
    # the same numbers, so nothing depended on how the val split was sharded.
    (out / "metrics.json").unlink()
    one = run_evaluation("detection", args, 1, arm, "local")
    for iou_type in ("bbox", "segm"):
        assert one[iou_type] == pytest.approx(both[iou_type], abs=1e-6), iou_type
    assert one["val_images"] == val_images
