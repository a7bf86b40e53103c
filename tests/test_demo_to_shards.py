"""The demo's own path, through the CLI: demo data -> shards in every layout, local and S3."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from split_samples import split_samples

from ladder_siam.cli import main as cli
from ladder_siam.data.manifest import load_split
from ladder_siam.data.tar_shards import iter_samples
from ladder_siam.io import storage


@pytest.mark.parametrize(
    "where", ["local", pytest.param("s3", marks=[pytest.mark.integration, pytest.mark.slow])]
)
def test_demo_data_becomes_shards_in_all_three_layouts(where: str, tmp_path: Path, request) -> None:
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    raw, datasets = storage.join(root, "raw"), storage.join(root, "datasets")
    assert cli(["demo-data", "--dest", raw, "--images", "30", "--size", "48"]) == 0
    for layout in ("imagefolder", "coco", "voc"):
        status = cli([
            "prepare-shards", "--source", storage.join(raw, layout), "--layout", layout,
            "--dest", storage.join(datasets, layout), "--shard-size", "8", "--workers", "2",
        ])  # fmt: skip
        assert status == 0

    for layout in ("imagefolder", "coco", "voc"):
        train = load_split(storage.join(datasets, layout))
        val = load_split(storage.join(datasets, layout), "val")
        assert (train.num_samples, val.num_samples) == (24, 6), layout
        assert train.skipped == [] and val.skipped == []

    imagefolder = load_split(storage.join(datasets, "imagefolder"))
    for shard in imagefolder.shard_uris():
        with storage.open_read(shard) as stream:
            labels = {int(sample["cls"]) for sample in iter_samples(stream)}
        assert len(labels) >= 3, "inputs are shuffled across shards: classes mix in each"

    voc_classes = load_split(storage.join(datasets, "voc")).classes
    coco_samples = {
        json.loads(s["json"])["file_name"]: s
        for s in split_samples(storage.join(datasets, "coco/train"))
    }
    voc_samples = split_samples(storage.join(datasets, "voc/train"))
    assert len(coco_samples) == len(voc_samples) == 24
    for voc in voc_samples:
        record = next(
            json.loads(c["json"]) for c in coco_samples.values() if c["jpg"] == voc["jpg"]
        )
        semantic = np.asarray(Image.open(io.BytesIO(voc["png"])))
        for instance in record["instances"]:
            rle = {
                **instance["segmentation"],
                "counts": instance["segmentation"]["counts"].encode(),
            }
            mask = coco_mask.decode(rle).astype(bool)
            # Visible instance masks are exactly where the semantic mask shows their class.
            assert (semantic[mask] == instance["category"] + 1).all()
            assert (
                voc_classes[instance["category"] + 1]
                == load_split(storage.join(datasets, "coco")).classes[instance["category"]]
            )
