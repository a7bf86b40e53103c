"""Per-image results of an evaluation, so that two runs can be compared image by image.

With one seed per method, the only uncertainty a report can put on a difference is the test
set's own sampling error, and the exact way to get it compares the two runs on the same
images (a paired test). An evaluation that can writes ``per_image.json`` beside its
``metrics.json``:

* ``order``: a digest that identifies the images and their order (the val split's shards
  and what the evaluation read from them, in reading order); two files pair only when
  theirs are equal;
* ``correct``: per accuracy metric (``probe_top1_res3``...), one bit per image, packed and
  base64-encoded (10k test images take 1.7 kB);
* ``counts``: per count metric (``miou``), ``{"intersection": [[...]], "union": [[...]]}``,
  pixels per image and class.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ladder_siam.errors import UsageError
from ladder_siam.io import storage

PER_IMAGE = "per_image.json"


@dataclass
class PerImage:
    """An evaluation's per-image results (see the module docstring).

    Attributes:
        order: Identifies the images and their order; two results pair only if equal.
        images: How many images were scored.
        correct: Per accuracy metric, a bool per image.
        counts: Per count metric, named ``[images, classes]`` arrays.
    """

    order: str
    images: int
    correct: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def order_digest(values: np.ndarray, *context: str) -> str:
    """A digest of the images in reading order.

    Args:
        values: Per-image values read with them (labels, pixel counts per class).
        context: What else identifies them, e.g. the split's shard checksums.
    """
    digest = hashlib.sha256(np.ascontiguousarray(values, dtype=np.int64).tobytes())
    for part in context:
        digest.update(part.encode())
    return digest.hexdigest()


def write_per_image(out: str, evidence: PerImage) -> None:
    """Writes ``per_image.json`` into an evaluation's output folder."""
    document: dict[str, Any] = {
        "order": evidence.order,
        "images": evidence.images,
        "correct": {
            name: base64.b64encode(np.packbits(bits.astype(bool)).tobytes()).decode()
            for name, bits in evidence.correct.items()
        },
        "counts": {
            name: {part: array.astype(int).tolist() for part, array in parts.items()}
            for name, parts in evidence.counts.items()
        },
    }
    storage.write_text(storage.join(out, PER_IMAGE), json.dumps(document) + "\n")


def read_per_image(out: str) -> PerImage | None:
    """An evaluation's per-image results, or None where it wrote none.

    Raises:
        ValueError: The file exists but is not a valid per-image document.
    """
    uri = storage.join(out, PER_IMAGE)
    if not storage.exists(uri):
        return None
    try:
        document = json.loads(storage.read_text(uri))
        images = int(document["images"])
        correct = {
            name: np.unpackbits(np.frombuffer(base64.b64decode(bits), np.uint8))[:images].astype(
                bool
            )
            for name, bits in document["correct"].items()
        }
        counts = {
            name: {part: np.asarray(array, dtype=np.int64) for part, array in parts.items()}
            for name, parts in document["counts"].items()
        }
        return PerImage(str(document["order"]), images, correct, counts)
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"{uri}: not a per-image results file: {error}") from error
