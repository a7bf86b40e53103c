"""Training batches that carry each image's class label beside whatever the transform made.

Pretraining needs no labels, but its online monitor (``pretrain/monitor.py``) trains a linear
probe on every step's batch when the shards have them. :class:`WithLabel` wraps the loader
transform and :class:`CollateWithLabels` the collate function, so a batch becomes
``(batch, labels)`` with ``labels`` int64 ``[B]``, for the CPU decode path and the device
decode path alike. The label is read from the raw sample's ``.cls``; no random draw is made,
so the transform's views are the ones an unlabelled loader gives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ladder_siam.data.manifest import SplitManifest
from ladder_siam.data.tar_shards import Sample

LABEL_FIELD = "cls"


def has_labels(manifest: SplitManifest) -> bool:
    """Whether every sample of the split carries a class label (``.cls``) and classes exist."""
    return LABEL_FIELD in manifest.fields and len(manifest.classes) > 1


class WithLabel:
    """A loader transform on raw samples (``decode=False``) that adds the sample's label.

    Args:
        transform: The wrapped transform, called on the raw sample.
    """

    def __init__(self, transform: Callable[[Sample], Any]) -> None:
        self.transform = transform

    def __call__(self, sample: Sample) -> tuple[Any, int]:
        """Returns ``(transform(sample), label)``.

        Raises:
            ValueError: The sample has no ``.cls`` although its manifest lists the field.
        """
        if LABEL_FIELD not in sample:
            raise ValueError(f"sample {sample['__key__']!r}: no .{LABEL_FIELD} label")
        return self.transform(sample), int(sample[LABEL_FIELD])  # type: ignore[call-overload]


class CollateWithLabels:
    """Collates ``(item, label)`` pairs into ``(collate(items), int64 labels)``.

    Args:
        collate: The wrapped collate function, called on the items.
    """

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, pairs: list[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
        """Returns the collated batch and its labels."""
        items, labels = zip(*pairs, strict=True)
        return self.collate(list(items)), torch.tensor(labels, dtype=torch.int64)
