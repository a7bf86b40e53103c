"""Scoring a finetuned FCN-D8 on a val split: every image once, one confusion matrix.

mmsegmentation's test protocol: the image is resized as in training (keep-ratio to the
preset's scale, no randomness), predicted whole (VOC) or with sliding windows (Cityscapes),
and the logits are resized back to the mask's original size before the arg-max, so scores are
at the original resolution. Each rank reads its share of the split exactly once
(:class:`~ladder_siam.data.splits.SplitReader`); the ranks' confusion matrices are summed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from ladder_siam.data.manifest import SplitManifest
from ladder_siam.data.splits import SplitReader, make_eval_loader
from ladder_siam.errors import UsageError
from ladder_siam.evals.segmentation.config import SegmentationConfig
from ladder_siam.evals.segmentation.data import SegmentationEvalTransform, normalize_images
from ladder_siam.evals.segmentation.miou import ConfusionMatrix, SegmentationScores
from ladder_siam.evals.segmentation.model import FCN, slide_inference, whole_inference
from ladder_siam.runtime.distributed import DistributedEnv
from ladder_siam.runtime.loop import autocast
from ladder_siam.runtime.per_image import PerImage, order_digest
from ladder_siam.runtime.progress import Progress

logger = logging.getLogger(__name__)


def _same_size_groups(
    items: list[tuple[torch.Tensor, torch.Tensor]],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # Images of one size share a forward pass; VOC's sizes vary, the demo's do not.
    groups: dict[tuple[torch.Size, torch.Size], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for image, mask in items:
        groups.setdefault((image.shape, mask.shape), []).append((image, mask))
    for group in groups.values():
        yield torch.stack([image for image, _ in group]), torch.stack([mask for _, mask in group])


@torch.no_grad()
def evaluate(
    model: FCN,
    split: SplitManifest,
    config: SegmentationConfig,
    env: DistributedEnv,
    per_image: list[torch.Tensor] | None = None,
) -> SegmentationScores:
    """Scores the model on every sample of ``split``, each predicted once over all ranks.

    Logits are predicted on the resized image (whole or sliding-window) and resized back to
    the mask's original size before the arg-max, as mmseg scores at the original resolution.

    Args:
        model: The finetuned FCN.
        split: The val split.
        config: The evaluation's settings.
        env: The process group (each rank scores its share).
        per_image: If given, receives this rank's per-image confusion matrices (``[C, C]``
            each, in reading order), for a paired bootstrap between two backbones.

    Raises:
        UsageError: The split has no labelled pixel, so no score is defined.
    """
    model.eval()
    num_classes = len(split.classes)
    reader = SplitReader(
        split, config.eval_batch_size, SegmentationEvalTransform(config.scale),
        collate=list, rank=env.rank, world_size=env.world_size,
    )  # fmt: skip
    matrix = ConfusionMatrix(num_classes, device=env.device)

    def predict(images: torch.Tensor) -> torch.Tensor:
        with autocast(env.device, config.precision):
            return model(images)[0].float()

    with Progress(None, "segmentation eval", unit="img", logger=logger, enabled=env.is_main) as bar:
        for batch in make_eval_loader(reader, config.workers):
            for images, masks in _same_size_groups(batch):
                pixels = normalize_images(images, env.device)
                if config.eval_mode == "slide":
                    logits = slide_inference(
                        predict, pixels, num_classes, config.slide_crop, config.slide_stride
                    )
                else:
                    logits = whole_inference(predict, pixels)
                logits = model.resize(logits, masks.shape[-2:])
                predictions, masks = logits.argmax(dim=1), masks.to(env.device)
                matrix.update(predictions, masks)
                if per_image is not None:
                    per_image += [
                        image_matrix(num_classes, prediction, mask)
                        for prediction, mask in zip(predictions, masks, strict=True)
                    ]
            bar.update(len(batch))
    matrix.all_reduce()
    if int(matrix.matrix.sum()) == 0:
        raise UsageError(f"{split.location}: no labelled pixels to score")
    return matrix.scores(split.classes)


def image_matrix(num_classes: int, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One image's confusion matrix, on the CPU."""
    single = ConfusionMatrix(num_classes, device=prediction.device)
    single.update(prediction, mask)
    return single.matrix.cpu()


def per_image_counts(matrices: list[torch.Tensor], split: SplitManifest) -> PerImage:
    """Per image and class: intersection and union pixels, for ``miou``'s paired bootstrap.

    The images are identified by the split's shard checksums and, in reading order, their
    ground truth (each image's pixels per class).
    """
    stacked = torch.stack(matrices).numpy()  # [images, truth, predicted]
    intersection = np.diagonal(stacked, axis1=1, axis2=2)
    truth, predicted = stacked.sum(axis=2), stacked.sum(axis=1)
    counts = {"intersection": intersection, "union": truth + predicted - intersection}
    order = order_digest(truth, *(shard.sha256 for shard in split.shards))
    return PerImage(order, len(matrices), counts={"miou": counts})
