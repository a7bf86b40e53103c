"""COCO, VOC and flat sources: annotations travel with their images into the shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from ladder_siam.data.manifest import load_split
from ladder_siam.data.tar_shards import iter_samples
from ladder_siam.io import storage
from ladder_siam.prep.prepare_shards import prepare_shards


def _save_jpeg(path: Path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _samples(split_uri: str) -> dict[str, dict]:
    samples = {}
    for uri in load_split(split_uri).shard_uris():
        with storage.open_read(uri) as stream:
            samples.update({s["__key__"]: s for s in iter_samples(stream)})
    return samples


def test_coco_annotations_are_converted_and_rescaled(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        _save_jpeg(root / "images" / name, 80, 100, seed=len(name))
    square = np.zeros((80, 100), dtype=np.uint8)
    square[20:60, 10:50] = 1
    compressed = coco_mask.encode(np.asfortranarray(square))
    annotations = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80},
            {"id": 3, "file_name": "c.jpg", "width": 100, "height": 80},
            {"id": 4, "file_name": "missing.jpg", "width": 100, "height": 80},
            {"id": 5, "file_name": "d.jpg", "width": 100, "height": 80},
        ],
        "categories": [{"id": 7, "name": "square"}, {"id": 3, "name": "blob"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [10, 20, 40, 40],
             "segmentation": [[10, 20, 50, 20, 50, 60, 10, 60]], "iscrowd": 0},
            {"id": 11, "image_id": 2, "category_id": 3, "bbox": [10, 20, 40, 40],
             "segmentation": {"size": [80, 100], "counts": compressed["counts"].decode()},
             "iscrowd": 1},
            {"id": 12, "image_id": 3, "category_id": 3, "bbox": "not a box"},
            # Compressed RLE whose counts do not decode to a 100x80 mask.
            {"id": 13, "image_id": 5, "category_id": 3, "bbox": [0, 0, 4, 4],
             "segmentation": {"size": [80, 100], "counts": "garbage"}, "iscrowd": 1},
        ],
    }  # fmt: skip
    (root / "annotations").mkdir()
    (root / "annotations/instances_train.json").write_text(json.dumps(annotations))
    (root / "annotations/instances_val.json").write_text("{ not json")

    dest = str(tmp_path / "shards")
    # A file that cannot be parsed at all fails the step, naming it; nothing is committed.
    with pytest.raises(ValueError, match=r"instances_val.json: not valid JSON"):
        prepare_shards(str(root), dest, layout="coco", max_side=50)
    assert not (tmp_path / "shards" / "manifest.json").exists(), "nothing committed"
    (root / "annotations/instances_val.json").unlink()

    prepare_shards(str(root), dest, layout="coco", max_side=50)
    train = load_split(storage.join(dest, "train"))
    assert train.classes == ["blob", "square"], "categories sorted by id"
    assert train.category_ids == [3, 7]
    assert [(Path(s.source).name, s.reason) for s in train.skipped] == [
        ("missing.jpg", "missing-image")
    ]
    # A bad annotation is dropped and listed; its image is kept with its other annotations.
    assert [(c.record, c.action, c.reason) for c in train.annotation_changes] == [
        ("annotation 12 of image 3", "dropped", "bad-box"),
        ("annotation 13 of image 5", "dropped", "bad-segmentation"),
    ]

    records = [json.loads(s["json"]) for s in _samples(storage.join(dest, "train")).values()]
    by_name = {record["file_name"]: record for record in records}
    assert set(by_name) == {"a.jpg", "b.jpg", "c.jpg", "d.jpg"}
    assert by_name["c.jpg"]["instances"] == by_name["d.jpg"]["instances"] == []
    for name, category, crowd in (("a.jpg", 1, 0), ("b.jpg", 0, 1)):
        record = by_name[name]
        assert (record["width"], record["height"]) == (50, 40)
        (instance,) = record["instances"]
        assert instance["category"] == category and instance["iscrowd"] == crowd
        assert instance["bbox"] == [5.0, 10.0, 20.0, 20.0]
        decoded = coco_mask.decode(
            {**instance["segmentation"], "counts": instance["segmentation"]["counts"].encode()}
        )
        assert decoded.shape == (40, 50)
        assert abs(int(decoded.sum()) - 40 * 40 / 4) <= 45, "the mask shrinks with its image"


def test_voc_masks_are_checked_and_resized_with_nearest(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    labels = np.zeros((60, 90), dtype=np.uint8)
    labels[10:40, 20:70] = 3
    labels[0:5, :] = 255
    for index in range(4):
        _save_jpeg(root / f"JPEGImages/{index}.jpg", 60, 90, seed=index)
    (root / "SegmentationClass").mkdir()
    palette_mask = Image.fromarray(labels, mode="P")
    palette_mask.putpalette([0, 0, 0, 128, 0, 0] * 128)
    palette_mask.save(root / "SegmentationClass/0.png")
    Image.fromarray(labels).save(root / "SegmentationClass/1.png")
    Image.fromarray(np.dstack([labels] * 3)).save(root / "SegmentationClass/2.png")
    Image.fromarray(labels[:30]).save(root / "SegmentationClass/3.png")
    unknown_class = labels.copy()
    unknown_class[50:, :] = 200  # VOC has 21 classes; 255 alone is the ignore label
    _save_jpeg(root / "JPEGImages/5.jpg", 60, 90, seed=5)
    Image.fromarray(unknown_class).save(root / "SegmentationClass/5.png")
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/train.txt").write_text("0\n1\n2\n3\n4\n5\n")

    dest = str(tmp_path / "shards")
    prepare_shards(str(root), dest, layout="voc", max_side=45)
    train = load_split(storage.join(dest, "train"))
    assert train.classes[:2] == ["background", "aeroplane"], "VOC's names without classes.txt"
    assert sorted((Path(s.source).name, s.reason) for s in train.skipped) == [
        ("2.jpg", "bad-mask"),
        ("3.jpg", "size-mismatch"),
        ("4", "missing-image"),
        ("5.jpg", "bad-mask"),
    ]
    samples = list(_samples(storage.join(dest, "train")).values())
    assert len(samples) == 2
    for sample in samples:
        image = Image.open(io.BytesIO(sample["jpg"]))
        mask = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert image.size == (45, 30) and mask.shape == (30, 45)
        assert set(np.unique(mask)) == {0, 3, 255}, "nearest keeps class indices valid"


def test_flat_layout_is_unlabelled(tmp_path: Path) -> None:
    for index in range(5):
        _save_jpeg(tmp_path / "flat" / f"sub{index % 2}" / f"{index}.JPG", 20, 20, seed=index)
    dest = str(tmp_path / "shards")
    prepare_shards(str(tmp_path / "flat"), dest, layout="flat", shard_size=2)
    split = load_split(dest)
    assert split.split == "train" and split.num_samples == 5 and len(split.shards) == 3
    assert all(set(s) == {"__key__", "jpg"} for s in _samples(storage.join(dest, "train")).values())
