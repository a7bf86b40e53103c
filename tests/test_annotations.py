"""Annotation files as users really have them: every bad record is listed, never a wrong label.

One test per class of problem seen on real buckets: silent loss, labels on the wrong image,
tracebacks instead of one line, and the imagefolder layout trap. A record problem is a skip
(an image) or a drop (one annotation of a kept image), listed with the file and the record; a
file that cannot be used at all fails the step in one line naming it.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from annotated_sources import image_size, save_image, save_mask, write_coco
from PIL import Image
from split_samples import split_samples

from ladder_siam.cli import main as cli
from ladder_siam.data.manifest import load_split
from ladder_siam.data.shards import decode_sample
from ladder_siam.evals.detection.data import instance_targets
from ladder_siam.io import storage
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.prep.sources import list_source

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}]


def _image(index: int, name: str | None = None) -> dict:
    width, height = image_size(index)
    return {"id": index, "file_name": name or f"{index}.jpg", "width": width, "height": height}


def _box(annotation_id: int, image_id: int, bbox: list, **extra: object) -> dict:
    return {"id": annotation_id, "image_id": image_id, "category_id": 1, "bbox": bbox, **extra}


@pytest.fixture
def messy_coco(tmp_path: Path) -> Path:
    """One COCO split with every record problem seen in the wild, beside two good images."""
    root = tmp_path / "coco"
    for index in (1, 2, 6, 7, 8):
        save_image(root / "images" / f"{index}.jpg", *image_size(index))
    save_image(root / "images" / "shared.jpg", *image_size(9))
    rle_size = [image_size(2)[1], image_size(2)[0]]
    pixels = rle_size[0] * rle_size[1]
    images = [
        _image(1),
        _image(2),
        {"id": 3, "file_name": "3.jpg", "height": 10},  # no width
        {"id": 4, "width": 10, "height": 10},  # no file_name
        {"id": 5, "file_name": "5.jpg", "width": "wide", "height": 10},
        _image(6),
        {**_image(7), "id": 6},  # the id of image 6 again
        _image(8, "shared.jpg"),
        _image(9, "shared.jpg"),  # the file of image 8 again
        _image(10),  # no such file
    ]
    annotations = [
        _box(100, 1, [2, 2, 10, 8]),
        _box(101, 2, [1, 1, 6, 6], segmentation=[[1, 1, 7, 1, 7, 7, 1, 7]], category_id=5),
        _box(102, 1, [math.nan, 2, 5, 5]),
        _box(103, 1, [2, 2, math.inf, 5]),
        _box(104, 1, [2, 2, -4, 5]),
        _box(105, 1, [2, 2, 0, 5]),
        _box(106, 1, [20, 10, 100, 4]),  # overhangs the 25-px-wide image: clipped
        _box(107, 1, [500, 500, 5, 5]),  # wholly outside
        _box(108, 2, [1, 1, 4, 4], segmentation={"size": [5, 5], "counts": [25]}),
        _box(109, 2, [1, 1, 4, 4], segmentation={"size": rle_size, "counts": [3, 4]}),
        _box(110, 2, [1, 1, 4, 4], segmentation={"size": rle_size, "counts": [-5, pixels + 5]}),
        _box(111, 2, [1, 1, 4, 4], segmentation={"size": rle_size, "counts": ""}),
        _box(112, 424242, [1, 1, 4, 4]),
        _box(113, 1, [1, 1, 4, 4], category_id=99),
        _box(114, 6, [1, 1, 4, 4]),  # of an image skipped for its duplicate id: not listed
        _box(115, 2, [1, 1, 4, 4], segmentation=[[1, 1, 2, 2]]),
        _box(116, 2, [1, 1, 4, 4], segmentation=[[1, 1, 1e12, 1, 5, 5]]),
        _box(117, 1, [1, 1, 4, 4], iscrowd=2),
        _box(118, 5, [1, 1, 4, 4]),  # of an image skipped as malformed: not listed
        "not an annotation",
    ]
    write_coco(
        root, "train", {"images": images, "annotations": annotations, "categories": CATEGORIES}
    )
    return root


def test_every_coco_record_problem_is_listed_with_its_file_and_record(messy_coco: Path) -> None:
    listing = list_source(str(messy_coco), "coco")
    annotation_file = str(messy_coco / "annotations/instances_train.json")

    skipped = {(s.reason, s.detail.split(":")[0]) for s in listing.skipped["train"]}
    assert skipped == {
        ("bad-record", "images[2]"),
        ("bad-record", "images[3]"),
        ("bad-record", "images[4]"),
        ("duplicate-id", "images[5] (id 6, '6.jpg')"),
        ("duplicate-id", "images[6] (id 6, '7.jpg')"),
        ("duplicate-file", "images[7] (id 8, 'shared.jpg')"),
        ("duplicate-file", "images[8] (id 9, 'shared.jpg')"),
        ("missing-image", "image 10 of " + annotation_file),
    }
    record_skips = [s for s in listing.skipped["train"] if s.reason != "missing-image"]
    assert all(s.source == annotation_file for s in record_skips), "the file is named"
    assert "'width' 'wide' is not a positive integer" in str(listing.skipped["train"])

    changes = {(c.record, c.action, c.reason) for c in listing.changes["train"]}
    assert changes == {
        ("annotation 102 of image 1", "dropped", "bad-box"),
        ("annotation 103 of image 1", "dropped", "bad-box"),
        ("annotation 104 of image 1", "dropped", "empty-box"),
        ("annotation 105 of image 1", "dropped", "empty-box"),
        ("annotation 106 of image 1", "clipped", "box-clipped"),
        ("annotation 107 of image 1", "dropped", "box-outside"),
        ("annotation 108 of image 2", "dropped", "bad-segmentation"),
        ("annotation 109 of image 2", "dropped", "bad-segmentation"),
        ("annotation 110 of image 2", "dropped", "bad-segmentation"),
        ("annotation 111 of image 2", "dropped", "bad-segmentation"),
        ("annotation 112", "dropped", "unknown-image"),
        ("annotation 113 of image 1", "dropped", "unknown-category"),
        ("annotation 115 of image 2", "dropped", "bad-segmentation"),
        ("annotation 116 of image 2", "dropped", "bad-segmentation"),
        ("annotation 117 of image 1", "dropped", "bad-record"),
        ("annotations[19]", "dropped", "bad-record"),
    }

    kept = {item.annotation["id"]: item.annotation for item in listing.items["train"]}
    assert set(kept) == {1, 2}
    assert [a["bbox"] for a in kept[1]["annotations"]] == [
        [2.0, 2.0, 10.0, 8.0],
        [20.0, 10.0, 5.0, 4.0],
    ]
    assert [a["category_id"] for a in kept[2]["annotations"]] == [5]


def test_the_kept_images_keep_exactly_their_own_valid_annotations_in_the_shards(
    messy_coco: Path, tmp_path: Path
) -> None:
    dest = str(tmp_path / "shards")
    prepare_shards(str(messy_coco), dest, layout="coco")
    split = load_split(storage.join(dest, "train"))
    assert split.num_samples == 2 and len(split.skipped) == 8
    assert len(split.annotation_changes) == 16, "dropped and clipped annotations are listed"

    for raw in split_samples(storage.join(dest, "train")):
        sample = decode_sample(raw)
        record = sample.instances
        index = record["image_id"]
        assert sample.image.size == image_size(index), "the record travels with its own image"
        boxes = [instance["bbox"] for instance in record["instances"]]
        assert boxes == {1: [[2, 2, 10, 8], [20, 10, 5, 4]], 2: [[1, 1, 6, 6]]}[index]
        # What the detection evaluation builds from them is finite and inside the image.
        target = instance_targets(record, sample.image.height, sample.image.width)
        assert bool(target["boxes"].isfinite().all())
        assert float(target["boxes"][:, 2].max()) <= sample.image.width
        assert target["masks"].shape[1:] == (sample.image.height, sample.image.width)


def test_coco_categories_must_mean_the_same_in_every_split(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    for index in (1, 2):
        save_image(root / "images" / f"{index}.jpg", *image_size(index))
    train = {"images": [_image(1)], "annotations": [], "categories": CATEGORIES}
    write_coco(root, "train", train)

    # A split may list fewer categories: class indices stay those of the union.
    write_coco(root, "val", {"images": [_image(2)], "categories": CATEGORIES[1:]})
    listing = list_source(str(root), "coco")
    assert listing.classes == ["cat", "dog"] and listing.category_ids == [1, 5]

    renamed = [{"id": 1, "name": "kitten"}, {"id": 5, "name": "dog"}]
    write_coco(root, "val", {"images": [_image(2)], "categories": renamed})
    with pytest.raises(
        ValueError,
        match=r"instances_val.json: category 1 is 'kitten' here but 'cat' in .*_train.json",
    ):
        list_source(str(root), "coco")

    renumbered = [{"id": 2, "name": "cat"}]
    write_coco(root, "val", {"images": [_image(2)], "categories": renumbered})
    with pytest.raises(ValueError, match=r"category 'cat' has id 2 here but 1 in"):
        list_source(str(root), "coco")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{ not json", "not valid JSON"),
        (b'{"categories": []}', "'images' is missing or not a list"),
        (b"[1, 2]", "expected a JSON object"),
        (
            b'{"images": [], "categories": [{"id": 1}]}',
            "categories[0] needs an integer 'id' and a non-empty 'name'",
        ),
        (
            b'{"images": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}',
            "category id 1 is listed twice",
        ),
        (b'{"images": [], "categories": [], "annotations": {}}', "'annotations' is not a list"),
        (
            b'{"images": [], "categories": [{"id": 1, "name": "caf\xe9"}]}',
            "not UTF-8 text (byte 0xe9 at offset",
        ),
    ],
)
def test_an_unusable_annotation_file_fails_in_one_line_naming_it(
    content: bytes,
    message: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "coco"
    save_image(root / "images" / "1.jpg", 30, 30)
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_bytes(content)
    dest = tmp_path / "shards"
    argv = ["prepare-shards", "--source", str(root), "--dest", str(dest), "--layout", "coco"]
    assert cli(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "instances_train.json: " in errors[0] and message in errors[0]
    assert "Traceback" not in capsys.readouterr().err
    assert not dest.exists(), "nothing written"


def test_voc_lines_are_kept_whole_and_a_byte_order_mark_is_not_part_of_an_id(
    tmp_path: Path,
) -> None:
    root = tmp_path / "voc"
    for index, image_id in enumerate(("first", "with space", "plain")):
        save_image(root / "JPEGImages" / f"{image_id}.jpg", *image_size(index))
        save_mask(root / "SegmentationClass" / f"{image_id}.png", *image_size(index), index)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_bytes(
        "\ufefffirst\r\nwith space\r\n\r\nplain\r\nplain\r\n".encode()
    )
    (root / "classes.txt").write_bytes("\ufeffbackground\r\nround thing\r\nsquare\r\n\r\n".encode())

    dest = str(tmp_path / "shards")
    prepare_shards(str(root), dest, layout="voc")
    split = load_split(storage.join(dest, "train"))
    assert split.classes == ["background", "round thing", "square"], "one class per line"
    assert split.num_samples == 3
    assert [(s.reason, s.detail.split(": ")[0].rsplit(" ", 2)[-2:]) for s in split.skipped] == [
        ("duplicate-id", ["line", "5"])
    ]
    # Each image keeps its own mask: image i was drawn with class i everywhere.
    for raw in split_samples(storage.join(dest, "train")):
        image = Image.open(io.BytesIO(raw["jpg"]))
        index = [image_size(i) for i in range(3)].index(image.size)
        assert set(np.unique(np.asarray(Image.open(io.BytesIO(raw["png"]))))) == {index}


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("classes.txt", b"background\n\ncat\n", "classes.txt: line 2 is empty"),
        (
            "classes.txt",
            b"background\ncat\ncat\n",
            "line 3: class 'cat' is already named on line 2",
        ),
        (
            "classes.txt",
            b"background\n\xffcat\n",
            "classes.txt: not UTF-8 text (byte 0xff at offset 11)",
        ),
        ("ImageSets/Segmentation/train.txt", b"a\n\xfe\n", "train.txt: not UTF-8 text (byte 0xfe"),
    ],
)
def test_a_voc_file_that_would_shift_or_garble_ids_fails_in_one_line(
    file: str, content: bytes, message: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "voc"
    save_image(root / "JPEGImages" / "a.jpg", 30, 30)
    save_mask(root / "SegmentationClass" / "a.png", 30, 30, 1)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    (root / file).write_bytes(content)
    argv = [
        "prepare-shards",
        "--source",
        str(root),
        "--dest",
        str(tmp_path / "s"),
        "--layout",
        "voc",
    ]
    assert cli(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0]


def test_a_class_named_train_is_a_class_when_no_split_folders_exist(tmp_path: Path) -> None:
    root = tmp_path / "classes"
    for index, name in enumerate(("train", "val", "cat")):
        save_image(root / name / f"{index}.jpg", *image_size(index))
    listing = list_source(str(root), "imagefolder")
    assert listing.classes == ["cat", "train", "val"]
    assert set(listing.items) == {"train"} and not listing.skipped
    labels = {Path(item.image).parent.name: item.label for item in listing.items["train"]}
    assert labels == {"cat": 0, "train": 1, "val": 2}


@pytest.mark.parametrize(
    ("layout", "files", "message"),
    [
        (
            "imagefolder",
            ["train/cat/0.jpg", "dog/1.jpg"],
            "train/ look like split folders (class folders inside), but dog/ beside them hold "
            "images too. Move dog/ into split folders",
        ),
        (
            "flat",
            ["train/0.jpg", "extra/1.jpg"],
            "train/ look like split folders (images inside), but extra/ beside them",
        ),
    ],
)
def test_split_folders_beside_other_folders_are_refused_saying_what_to_do(
    layout: str, files: list[str], message: str, tmp_path: Path
) -> None:
    for index, relative in enumerate(files):
        save_image(tmp_path / "src" / relative, *image_size(index))
    with pytest.raises(ValueError, match="ambiguous layout") as raised:
        list_source(str(tmp_path / "src"), layout)
    assert message in str(raised.value) and "rename train/ if they are classes" in str(raised.value)


def test_split_folders_are_found_by_their_structure(tmp_path: Path) -> None:
    for index, relative in enumerate(("train/cat/0.jpg", "val/dog/1.jpg", "test/2.jpg")):
        save_image(tmp_path / "src" / relative, *image_size(index))
    listing = list_source(str(tmp_path / "src"), "imagefolder")
    assert set(listing.items) == {"train", "val"} and listing.classes == ["cat", "dog"]
    assert [s.reason for s in listing.skipped["test"]] == ["no-class"], "listed, not lost"


def test_no_label_moves_to_another_image(tmp_path: Path) -> None:
    """Each image shows its label (a class colour) and its size names it: shuffled into
    shards, with invalid neighbours dropped, every sample still carries its own label."""
    colours = [(230, 30, 30), (30, 230, 30), (30, 30, 230)]
    root = tmp_path / "folders"
    for index in range(12):
        label = index % 3
        save_image(
            root / "train" / f"class{label}" / f"{index}.jpg", *image_size(index), colours[label]
        )
    (root / "train" / "class1" / "broken.jpg").write_bytes(b"not a jpeg")
    dest = str(tmp_path / "shards")
    prepare_shards(str(root), dest, shard_size=5, workers=2, seed=3)
    samples = split_samples(storage.join(dest, "train"))
    assert len(samples) == 12
    for raw in samples:
        pixel = np.asarray(Image.open(io.BytesIO(raw["jpg"])).convert("RGB"))[5, 5]
        shown = int(np.argmax([-np.abs(pixel.astype(int) - c).sum() for c in colours]))
        assert int(raw["cls"]) == shown
