"""Semantic segmentation scores from a confusion matrix: mIoU, pixel and mean accuracy.

The scores follow mmsegmentation's ``IoUMetric``, the toolbox the paper evaluates with: one
confusion matrix is accumulated over the whole validation set (not averaged per image), a
class's IoU is ``TP / (TP + FP + FN)``, and classes whose IoU or accuracy is undefined (never in
the ground truth nor the prediction, or never in the ground truth) are left out of the means.
Pixels labelled ``ignore_index`` (VOC's object boundaries, 255) count for nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ladder_siam.data.manifest import IGNORE_LABEL


@dataclass(frozen=True)
class SegmentationScores:
    """The scores of a confusion matrix, all in percent (as mmsegmentation reports them).

    Attributes:
        miou: Mean IoU over the classes whose IoU is defined.
        pixel_accuracy: Correct pixels over all labelled pixels (mmseg's ``aAcc``).
        mean_accuracy: Mean over classes present in the ground truth of their pixel accuracy.
        per_class_iou: IoU by class name; None for a class absent from ground truth and
            prediction alike.
    """

    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    per_class_iou: dict[str, float | None]


class ConfusionMatrix:
    """Counts (ground-truth class, predicted class) pairs over labelled pixels.

    Args:
        num_classes: Number of classes; labels and predictions are indices below it.
        ignore_index: Ground-truth value of pixels that are not scored.
        device: Where the counts live (the evaluation device, so updates never sync).

    Attributes:
        matrix: ``[num_classes, num_classes]`` int64 counts, rows ground truth, columns
            prediction.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_LABEL,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes {num_classes}: at least 1")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Adds a batch of predicted and ground-truth class maps of the same shape.

        Raises:
            ValueError: The shapes differ, or a labelled pixel has a class outside the range.
        """
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(prediction.shape)} != target {tuple(target.shape)}"
            )
        labelled = target != self.ignore_index
        truth = target[labelled].long()
        predicted = prediction[labelled].long()
        if bool(((truth < 0) | (truth >= self.num_classes)).any()):
            bad = sorted(set(truth[(truth < 0) | (truth >= self.num_classes)].tolist()))
            raise ValueError(
                f"ground-truth classes {bad[:10]} outside 0..{self.num_classes - 1} "
                f"(and not the ignore index {self.ignore_index})"
            )
        pairs = truth * self.num_classes + predicted
        counts = torch.bincount(pairs, minlength=self.num_classes**2)
        self.matrix += counts.view(self.num_classes, self.num_classes)

    def all_reduce(self) -> None:
        """Sums the matrices of all ranks in place (a no-op without a process group)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix)

    def scores(self, class_names: Sequence[str]) -> SegmentationScores:
        """The scores of the counts so far (call :meth:`all_reduce` first when distributed).

        Args:
            class_names: One name per class, in index order.

        Raises:
            ValueError: The number of names is not the number of classes.
        """
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        counts = self.matrix.double().cpu()
        hits = counts.diagonal()
        truth = counts.sum(dim=1)
        union = truth + counts.sum(dim=0) - hits
        iou = [float(h / u) if u > 0 else None for h, u in zip(hits, union, strict=True)]
        accuracy = [float(h / t) for h, t in zip(hits, truth, strict=True) if t > 0]
        defined = [value for value in iou if value is not None]
        total = float(truth.sum())
        return SegmentationScores(
            miou=100 * _mean(defined),
            pixel_accuracy=100 * float(hits.sum()) / total if total else math.nan,
            mean_accuracy=100 * _mean(accuracy),
            per_class_iou={
                name: None if value is None else 100 * value
                for name, value in zip(class_names, iou, strict=True)
            },
        )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
