"""Small annotated sources on disk, built record by record, for the annotation tests.

Every image gets a size of its own, so that a sample read back from a shard names the image
it came from by its pixels alone, whatever its annotation says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def save_image(
    path: Path, width: int, height: int, colour: tuple[int, int, int] = (90, 90, 90)
) -> None:
    """A solid-colour JPEG (solid, so that its colour survives JPEG coding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path, quality=95)


def save_mask(path: Path, width: int, height: int, value: int) -> None:
    """A VOC class-index mask filled with ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width), value, dtype=np.uint8)).save(path)


def write_coco(root: Path, split: str, document: Any) -> Path:
    """Writes ``annotations/instances_<split>.json`` (NaN and Infinity as JSON's extension)."""
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def image_size(index: int) -> tuple[int, int]:
    """The unique ``(width, height)`` of the image with this index."""
    return 24 + index, 20 + 2 * index
