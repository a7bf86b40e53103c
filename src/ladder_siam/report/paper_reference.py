"""The paper's published numbers, shown in the report for context.

Transcribed from *Ladder Siamese Network* (Yoshihashi et al.), Tables 1, 2 and 7. All are
ResNet-50 pretrained on ImageNet-1k: "IN acc@1" is the 100-epoch linear probe on res5 (Table 7:
on each stage), "box/mask mAP" Mask R-CNN FPN 1x on COCO val2017, "VOC/Cityscapes mIoU"
FCN-D8. Our runs use other data and schedules, so only the direction of the differences
between methods is comparable, never the values themselves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BaselineComparison:
    """One row of Table 1: BYOL against Ladder-BYOL for one metric and schedule.

    Attributes:
        epochs: Pretraining epochs.
        metric: The downstream metric, as the paper names it.
        byol: BYOL's score.
        ladder_byol: Ladder-BYOL's score.
    """

    epochs: int
    metric: str
    byol: float
    ladder_byol: float


@dataclass(frozen=True)
class MethodScores:
    """One row of Table 2 (200-epoch pretraining); None where the paper reports nothing.

    Attributes:
        method: The method's name in the paper.
        in_acc: ImageNet linear-probe top-1 (%).
        box_map: COCO box mAP.
        mask_map: COCO mask mAP.
        voc_miou: PASCAL VOC mIoU.
        cityscapes_miou: Cityscapes mIoU.
    """

    method: str
    in_acc: float | None
    box_map: float | None
    mask_map: float | None
    voc_miou: float | None
    cityscapes_miou: float | None


# Table 1. The 400-epoch schedule was only evaluated on ImageNet.
TABLE_1 = (
    BaselineComparison(100, "IN acc@1", 67.4, 68.3),
    BaselineComparison(100, "COCO box mAP", 39.3, 40.5),
    BaselineComparison(100, "VOC mIoU", 63.8, 66.6),
    BaselineComparison(200, "IN acc@1", 71.7, 72.8),
    BaselineComparison(200, "COCO box mAP", 40.9, 41.4),
    BaselineComparison(200, "VOC mIoU", 64.3, 67.4),
    BaselineComparison(400, "IN acc@1", 73.1, 73.6),
)

# Table 2, the paper's own two rows (the other methods' rows are quoted from their papers).
TABLE_2 = (
    MethodScores("Ladder-BYOL", 72.8, 41.4, 37.2, 67.4, 73.9),
    MethodScores("Ladder-DenseBYOL", 72.0, 41.1, 37.0, 68.6, 75.2),
)

# Table 7: ImageNet linear-probe top-1 (%) on each stage's pooled features.
TABLE_7 = {
    "BYOL": {"res2": 28.5, "res3": 40.9, "res4": 56.8, "res5": 68.1},
    "Ladder-BYOL": {"res2": 31.9, "res3": 47.2, "res4": 61.7, "res5": 68.7},
}
