"""The demo data generator: determinism, consistency of the three layouts, S3 output."""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ladder_siam.io import storage
from ladder_siam.prep.demo_data import VOC_PALETTE, get_args_parser, main, make_demo_data
from ladder_siam.prep.scenes import CLASS_NAMES, MIN_IMAGE_SIZE, MIN_VISIBLE_AREA, render_scene

IMAGES = 32
SIZE = 64
SEED = 7
VAL_FRACTION = 0.25
TRAIN_IMAGES = 24


def tree(root: Path) -> dict[str, bytes]:
    files = (path for path in root.rglob("*") if path.is_file())
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in files}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("demo")
    summary = make_demo_data(
        str(dest), images=IMAGES, size=SIZE, seed=SEED, val_fraction=VAL_FRACTION
    )
    assert (summary.train_images, summary.val_images) == (TRAIN_IMAGES, IMAGES - TRAIN_IMAGES)
    assert summary.class_names == CLASS_NAMES
    return dest


def split_ids(demo: Path) -> dict[str, list[str]]:
    folder = demo / "voc" / "ImageSets" / "Segmentation"
    return {split: (folder / f"{split}.txt").read_text().split() for split in ("train", "val")}


def test_same_seed_gives_identical_files_and_another_seed_differs(
    demo: Path, tmp_path: Path
) -> None:
    make_demo_data(
        str(tmp_path / "again"), images=IMAGES, size=SIZE, seed=SEED, val_fraction=VAL_FRACTION
    )
    assert tree(tmp_path / "again") == tree(demo)

    make_demo_data(
        str(tmp_path / "other"), images=IMAGES, size=SIZE, seed=SEED + 1, val_fraction=VAL_FRACTION
    )
    ours, theirs = tree(demo), tree(tmp_path / "other")
    jpegs = [name for name in ours if name.startswith("coco/images/")]
    assert len(jpegs) == IMAGES
    assert all(ours[name] != theirs[name] for name in jpegs)


def test_scene_depends_only_on_seed_and_index() -> None:
    later = render_scene(SEED, 5, SIZE)
    for index in range(5):
        render_scene(SEED, index, SIZE)
    again = render_scene(SEED, 5, SIZE)
    assert np.array_equal(later.image, again.image)
    assert np.array_equal(later.semantic, again.semantic)


def test_small_scenes_are_consistent() -> None:
    for index in range(300):
        scene = render_scene(0, index, MIN_IMAGE_SIZE)
        assert scene.image.shape == (MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3)
        assert scene.instances, f"scene {index} has no visible shape"
        coverage = np.zeros(scene.semantic.shape, dtype=int)
        for instance in scene.instances:
            assert instance.area == instance.mask.sum() >= MIN_VISIBLE_AREA
            assert (scene.semantic[instance.mask] == instance.category).all()
            coverage += instance.mask
        assert coverage.max() == 1
        assert ((coverage == 1) == (scene.semantic > 0)).all()
        largest = max(scene.instances, key=lambda instance: instance.area)
        assert scene.label == largest.category


def test_coco_masks_match_voc_masks_and_boxes_enclose_them(demo: Path) -> None:
    ids = split_ids(demo)
    annotation_ids = []
    for split in ("train", "val"):
        coco = COCO(str(demo / "coco" / "annotations" / f"instances_{split}.json"))
        assert [category["name"] for category in coco.loadCats(coco.getCatIds())] == list(
            CLASS_NAMES
        )
        images = coco.loadImgs(sorted(coco.getImgIds()))
        assert [image["file_name"] for image in images] == [f"{i}.jpg" for i in ids[split]]
        for image in images:
            assert (image["width"], image["height"]) == (SIZE, SIZE)
            png = Image.open(demo / "voc" / "SegmentationClass" / f"{image['file_name'][:-4]}.png")
            assert png.mode == "P"
            assert png.getpalette()[: 3 * 7] == VOC_PALETTE[: 3 * 7]
            semantic = np.array(png)
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            assert annotations
            union = {category: np.zeros_like(semantic, dtype=bool) for category in range(1, 7)}
            for annotation in annotations:
                annotation_ids.append(annotation["id"])
                mask = coco.annToMask(annotation).astype(bool)
                assert annotation["area"] == mask.sum() >= MIN_VISIBLE_AREA
                assert annotation["iscrowd"] == 0
                assert not (union[annotation["category_id"]] & mask).any()
                union[annotation["category_id"]] |= mask
                x, y, w, h = annotation["bbox"]
                rows, cols = np.nonzero(mask)
                assert (cols.min(), rows.min()) == (x, y)
                assert (cols.max() + 1, rows.max() + 1) == (x + w, y + h)
                rle = annotation["segmentation"]
                assert list(mask_utils.toBbox(rle)) == annotation["bbox"]
            for category, mask in union.items():
                assert np.array_equal(mask, semantic == category), (image, category)
            assert set(np.unique(semantic)) <= set(range(7))
    assert min(annotation_ids) == 1
    assert len(set(annotation_ids)) == len(annotation_ids)


def test_imagefolder_class_is_the_largest_visible_shape(demo: Path) -> None:
    ids = split_ids(demo)
    for split in ("train", "val"):
        coco = COCO(str(demo / "coco" / "annotations" / f"instances_{split}.json"))
        files = sorted((demo / "imagefolder" / split).glob("*/*.jpg"))
        assert sorted(path.stem for path in files) == ids[split]
        for path in files:
            annotations = coco.imgToAnns[int(path.stem)]
            largest = max(annotations, key=lambda annotation: annotation["area"])
            assert path.parent.name == CLASS_NAMES[largest["category_id"] - 1]


def test_splits_partition_ids_and_jpegs_are_shared(demo: Path) -> None:
    ids = split_ids(demo)
    every_id = [f"{index:06d}" for index in range(IMAGES)]
    assert ids["train"] == every_id[:TRAIN_IMAGES]
    assert ids["val"] == every_id[TRAIN_IMAGES:]
    assert (demo / "voc" / "classes.txt").read_text().splitlines() == [
        "background",
        *CLASS_NAMES,
    ]
    for split, split_image_ids in ids.items():
        for image_id in split_image_ids:
            jpeg = (demo / "coco" / "images" / f"{image_id}.jpg").read_bytes()
            assert (demo / "voc" / "JPEGImages" / f"{image_id}.jpg").read_bytes() == jpeg
            (folder_copy,) = (demo / "imagefolder" / split).glob(f"*/{image_id}.jpg")
            assert folder_copy.read_bytes() == jpeg
            image = Image.open(io.BytesIO(jpeg))
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SIZE, SIZE))
            assert "exif" not in image.info
    description = json.loads((demo / "demo.json").read_text())
    assert description["seed"] == SEED
    assert description["splits"] == {"train": TRAIN_IMAGES, "val": IMAGES - TRAIN_IMAGES}


@pytest.mark.integration
@pytest.mark.slow
def test_s3_destination_holds_the_same_files(demo: Path, s3_bucket: str) -> None:
    dest = f"{s3_bucket}/datasets/demo"
    make_demo_data(dest, images=IMAGES, size=SIZE, seed=SEED, val_fraction=VAL_FRACTION)
    uploaded = {
        info.uri.removeprefix(f"{dest}/"): storage.read_bytes(info.uri)
        for info in storage.list_files(dest)
    }
    assert uploaded == tree(demo)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"images": 0}, "images"),
        ({"size": MIN_IMAGE_SIZE - 1}, "size"),
        ({"val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_rejects_out_of_range_arguments(
    tmp_path: Path, arguments: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_demo_data(str(tmp_path), **arguments)
    assert not any(tmp_path.iterdir())


def test_cli_options_reach_the_generator(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    args = parser.parse_args(["--dest", str(tmp_path), "--images", "5", "--size", "40"])
    assert (args.seed, args.val_fraction) == (0, 0.2)
    with caplog.at_level(logging.INFO, logger="ladder_siam.prep.demo_data"):
        main(args)
    assert "4 train and 1 val images" in caplog.text
    image = Image.open(tmp_path / "coco" / "images" / "000004.jpg")
    assert image.size == (40, 40)
