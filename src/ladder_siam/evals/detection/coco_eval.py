"""COCO box and mask AP with pycocotools, from shard records and Mask R-CNN outputs.

The ground truth is rebuilt from the val shards' instance records (the original image ids,
sizes, category ids, boxes, areas, crowd flags and RLE masks), so the numbers are those of
COCO's own ``COCOeval`` on the original annotations (unless ``prepare-shards --max-side``
down-scaled them, which moves objects between the size ranges of APs/APm/APl). Predictions
become COCO results the way detectron2's ``COCOEvaluator`` writes them: boxes as
``[x, y, w, h]``, masks thresholded at 0.5 and RLE-encoded, contiguous labels mapped back to
the dataset's category ids.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ladder_siam.errors import UsageError

logger = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
# The first six entries of COCOeval.stats, in order.
SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl")
MASK_THRESHOLD = 0.5

Record = Mapping[str, Any]


# eq=False: the fields are arrays, which have no single truth value to compare by.
@dataclass(frozen=True, eq=False)
class ImageDetections:
    """The detections of one image, compact enough to gather from every rank.

    Attributes:
        image_id: The COCO image id.
        boxes: float32 ``[N, 4]`` boxes (x1, y1, x2, y2) in the image's pixels.
        scores: float32 ``[N]`` confidences.
        labels: int64 ``[N]`` model labels: category index + 1 (0 is the background).
        masks: N compressed RLEs of the binary masks.
    """

    image_id: int
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: list[dict[str, Any]]

    @classmethod
    def from_output(cls, image_id: int, output: Mapping[str, torch.Tensor]) -> ImageDetections:
        """Converts one image's Mask R-CNN output (``masks``: ``[N, 1, H, W]`` probabilities).

        Masks are binarised at 0.5, as torchvision's and detectron2's COCO evaluations do.
        """
        binary = (output["masks"][:, 0] > MASK_THRESHOLD).to("cpu", torch.uint8).numpy()
        return cls(
            image_id=int(image_id),
            boxes=output["boxes"].detach().to("cpu", torch.float32).numpy().reshape(-1, 4),
            scores=output["scores"].detach().to("cpu", torch.float32).numpy(),
            labels=output["labels"].detach().to("cpu", torch.int64).numpy(),
            masks=encode_masks(binary),
        )


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """COCO RLEs of binary ``[N, H, W]`` masks."""
    if masks.shape[0] == 0:
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def category_ids(records: Sequence[Record]) -> dict[int, int]:
    """Contiguous category index -> original COCO category id, as the records use them.

    Raises:
        ValueError: One index appears with two category ids.
    """
    mapping: dict[int, int] = {}
    for record in records:
        for instance in record["instances"]:
            index, category_id = int(instance["category"]), int(instance["category_id"])
            if mapping.setdefault(index, category_id) != category_id:
                raise ValueError(
                    f"image {record['image_id']}: category {index} has ids "
                    f"{mapping[index]} and {category_id}"
                )
    return mapping


def ground_truth(records: Sequence[Record], categories: Sequence[str]) -> COCO:
    """A pycocotools ``COCO`` object holding the records' images and annotations.

    Categories are those that occur in the records. A category with no ground truth has no
    AP in COCOeval either (it is left out of the mean), so nothing is lost by omitting it.

    Raises:
        ValueError: An image id appears twice, or a category index has no name.
    """
    ids = category_ids(records)
    if ids and max(ids) >= len(categories):
        raise ValueError(f"category index {max(ids)} but only {len(categories)} class names")
    images, annotations, seen = [], [], set()
    for record in records:
        image_id = int(record["image_id"])
        if image_id in seen:
            raise ValueError(f"image id {image_id} appears twice in the evaluation records")
        seen.add(image_id)
        images.append({"id": image_id, "width": record["width"], "height": record["height"]})
        for instance in record["instances"]:
            x, y, w, h = instance["bbox"]
            # Without a mask, an instance's box stands in for it (as a polygon).
            box_polygon = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            annotations.append(
                {
                    # COCOeval reads annotation id 0 as "unmatched", so ids start at 1.
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(instance["category_id"]),
                    "bbox": [x, y, w, h],
                    "area": float(instance["area"]),
                    "iscrowd": int(instance.get("iscrowd", 0)),
                    "segmentation": instance.get("segmentation") or box_polygon,
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": categories[index]} for index, cid in ids.items()],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_results(
    detections: Sequence[ImageDetections], ids: Mapping[int, int], iou_type: str
) -> list[dict[str, Any]]:
    """COCO result entries for ``bbox`` or ``segm`` evaluation.

    A detection whose category has no ground truth is dropped: COCOeval would ignore it.
    Mask results carry no box, so that COCOeval sizes them (small/medium/large) by mask area,
    as detectron2's evaluator does.
    """
    results = []
    for image in detections:
        for index in range(len(image.scores)):
            category_id = ids.get(int(image.labels[index]) - 1)
            if category_id is None:
                continue
            result: dict[str, Any] = {
                "image_id": image.image_id,
                "category_id": category_id,
                "score": float(image.scores[index]),
            }
            if iou_type == "bbox":
                x1, y1, x2, y2 = (float(v) for v in image.boxes[index])
                result["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                result["segmentation"] = image.masks[index]
            results.append(result)
    return results


def coco_evaluate(
    gt_records: Sequence[Record],
    predictions: Sequence[ImageDetections],
    categories: Sequence[str],
) -> dict[str, dict[str, float | None]]:
    """COCO AP of ``predictions`` for boxes and masks, in percent.

    Args:
        gt_records: The COCO record of every evaluated image, as the shards store it
            (``image_id``, ``width``, ``height``, ``instances`` with ``bbox``, ``category``,
            ``category_id``, ``iscrowd``, ``area``, ``segmentation``).
        predictions: Detections of (some of) those images.
        categories: Class names; index = contiguous category (the manifest's classes).

    Returns:
        ``{"bbox": {...}, "segm": {...}}``, each with AP, AP50, AP75, APs, APm, APl. A value is
        None where COCOeval has no ground truth to score (e.g. APl without large objects).

    Raises:
        ValueError: No ground-truth instance at all, or a prediction for an unknown image.
    """
    if not any(record["instances"] for record in gt_records):
        raise UsageError("the evaluation split has no annotated instances: no AP to compute")
    gt = ground_truth(gt_records, categories)
    unknown = {p.image_id for p in predictions} - set(gt.getImgIds())
    if unknown:
        raise ValueError(f"predictions for images not in the ground truth: {sorted(unknown)[:5]}")
    ids = category_ids(gt_records)
    return {
        iou_type: _evaluate(gt, coco_results(predictions, ids, iou_type), iou_type)
        for iou_type in IOU_TYPES
    }


def _evaluate(gt: COCO, results: list[dict[str, Any]], iou_type: str) -> dict[str, float | None]:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        evaluator = COCOeval(gt, gt.loadRes(results) if results else _no_results(gt), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    summary = "\n".join(line for line in output.getvalue().splitlines() if "Average" in line)
    logger.info("COCO %s evaluation of %d images:\n%s", iou_type, len(gt.getImgIds()), summary)
    return {
        name: None if value < 0 else 100.0 * float(value)
        for name, value in zip(SUMMARY, evaluator.stats[: len(SUMMARY)], strict=True)
    }


def _no_results(gt: COCO) -> COCO:
    # loadRes cannot take an empty list, but COCOeval scores an empty result set: AP 0 where
    # there is ground truth, and "none" (-1) where there is none, as for any other result.
    empty = COCO()
    empty.dataset = {**gt.dataset, "annotations": []}
    empty.createIndex()
    return empty
