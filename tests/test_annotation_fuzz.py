"""Property-based: random COCO and VOC annotation files, valid and malformed, never lose or
move a label.

For any annotation file Hypothesis builds, ``prepare-shards``:

* exits 0, or 2 with exactly one error line (never a traceback);
* accounts for every image record: written into a shard, or listed as skipped;
* attaches to each sample only annotations of that very image (each image file has a size of
  its own, so a sample's pixels name the image it came from);
* writes byte-identical shards for the same input.

A few dozen examples run in the fast tier; ``LADDER_SIAM_FUZZ_EXAMPLES=2000`` runs longer.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from annotated_sources import image_size, save_image, save_mask, write_coco
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from split_samples import split_samples

from ladder_siam.cli import main as cli
from ladder_siam.data.manifest import load_split
from ladder_siam.data.shards import decode_sample
from ladder_siam.io import storage

EXAMPLES = int(os.environ.get("LADDER_SIAM_FUZZ_EXAMPLES", "30"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
IMAGES = (1, 2, 3)  # files on disk; id 4 names a file that is not there
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}]

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 6),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.text(max_size=3),
    st.lists(st.integers(-2, 40), max_size=5),
    st.dictionaries(st.sampled_from(["size", "counts"]), st.integers(-1, 3), max_size=2),
)
coordinate = st.one_of(st.floats(-40, 80, width=32), st.sampled_from([math.nan, math.inf, 0.0]))


@st.composite
def image_records(draw: st.DrawFn) -> dict[str, Any]:
    index = draw(st.sampled_from((*IMAGES, 4)))
    width, height = image_size(index)
    record: dict[str, Any] = {
        "id": draw(st.one_of(st.just(index), st.integers(1, 4))),  # ids may repeat
        "file_name": f"{index}.jpg",
        "width": width,
        "height": height,
    }
    # Hypothesis shrinks integers towards 0: 0 keeps records valid, so failures shrink to
    # the one broken field that matters.
    if draw(st.integers(0, 3)) == 3:  # one field broken or missing
        key = draw(st.sampled_from(sorted(record)))
        if draw(st.booleans()):
            del record[key]
        else:
            record[key] = draw(junk)
    return record


@st.composite
def segmentations(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["none", "polygon", "runs", "string", "junk"]))
    if kind == "polygon":
        return [draw(st.lists(coordinate, min_size=0, max_size=10))]
    if kind in ("runs", "string"):
        # Mostly the size of one of the images, so that some masks are valid.
        width, height = image_size(draw(st.sampled_from(IMAGES)))
        size = draw(
            st.one_of(
                st.just([height, width]), st.lists(st.integers(0, 40), min_size=2, max_size=2)
            )
        )
    if kind == "runs":
        cuts = sorted(draw(st.lists(st.integers(0, size[0] * size[1]), max_size=4)))
        exact = [b - a for a, b in zip([0, *cuts], [*cuts, size[0] * size[1]], strict=True)]
        counts = draw(st.one_of(st.just(exact), st.lists(st.integers(-3, 900), max_size=6)))
        return {"size": size, "counts": counts}
    if kind == "string":
        text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7F), max_size=8)
        return {"size": size, "counts": draw(text)}
    return None if kind == "none" else draw(junk)


@st.composite
def annotation_records(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 9:
        return draw(junk)
    record = {
        "id": draw(st.integers(0, 1000)),
        "image_id": draw(st.sampled_from([*IMAGES, 4, 5])),
        "category_id": draw(st.sampled_from([1, 5])),
        "bbox": draw(st.lists(st.floats(0, 30, width=32), min_size=4, max_size=4)),
        "segmentation": None,
    }
    if draw(st.integers(0, 2)) == 2:  # one field broken, missing or unusual
        key = draw(st.sampled_from(["image_id", "category_id", "bbox", "segmentation", "iscrowd"]))
        if key == "bbox":
            record["bbox"] = draw(st.one_of(st.lists(coordinate, min_size=4, max_size=4), junk))
        elif key == "segmentation":
            record["segmentation"] = draw(segmentations())
        elif draw(st.booleans()):
            record.pop(key, None)
        else:
            record[key] = draw(st.one_of(st.sampled_from([0, 1, 99]), junk))
    return record


@st.composite
def coco_documents(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 19)) == 19:
        return draw(junk)
    document = {
        "images": draw(st.lists(image_records(), min_size=1, max_size=5)),
        "annotations": draw(st.lists(annotation_records(), min_size=1, max_size=8)),
        "categories": CATEGORIES if draw(st.integers(0, 9)) < 9 else draw(junk),
    }
    return document


def _prepare(source: Path, dest: Path, layout: str, caplog: pytest.LogCaptureFixture) -> int:
    """Runs the CLI; a failure must be exactly one line (a traceback would raise here)."""
    caplog.clear()
    argv = ["prepare-shards", "--source", str(source), "--dest", str(dest), "--layout", layout]
    status = cli(argv)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    event(f"{layout}: exit {status}" + (f" {errors[0].split(': ')[-1][:40]}" if errors else ""))
    if status == 0:
        assert not errors
    else:
        assert status == 2 and len(errors) == 1 and "\n" not in errors[0], errors
    return status


def _shard_bytes(dest: Path) -> list[bytes]:
    return [
        Path(storage.local_path(uri)).read_bytes() for uri in load_split(str(dest)).shard_uris()
    ]


def _expected_box(bbox: list[float], width: int, height: int) -> list[float]:
    x, y, w, h = bbox
    x0, y0 = min(max(x, 0), width), min(max(y, 0), height)
    return [x0, y0, min(max(x + w, 0), width) - x0, min(max(y + h, 0), height) - y0]


def _check_coco_labels(document: dict[str, Any], dest: Path) -> None:
    for raw in split_samples(str(dest / "train")):
        sample = decode_sample(raw)
        record = sample.instances
        index = int(record["file_name"].removesuffix(".jpg"))
        assert sample.image.size == image_size(index), "the record is its image's own"
        own = [
            a
            for a in document["annotations"]
            if isinstance(a, dict) and a.get("image_id") == record["image_id"]
        ]
        assert len(record["instances"]) <= len(own)
        count = len(record["instances"])
        event(f"coco: a sample with {'2 or more' if count >= 2 else count} instances")
        width, height = sample.image.size
        for instance in record["instances"]:
            assert all(math.isfinite(v) for v in instance["bbox"])
            x, y, w, h = instance["bbox"]
            assert w > 0 and h > 0 and x >= 0 and x + w <= width + 1e-6 and y + h <= height + 1e-6
            assert any(
                a.get("category_id") == instance["category_id"]
                and isinstance(a.get("bbox"), list)
                and len(a["bbox"]) == 4
                and all(isinstance(v, int | float) for v in a["bbox"])
                and _expected_box(a["bbox"], width, height) == pytest.approx(instance["bbox"])
                for a in own
            ), f"instance {instance} is not one of image {record['image_id']}'s annotations"


@FUZZ
@given(document=coco_documents())
def test_random_coco_files_lose_no_image_and_move_no_label(
    document: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "coco"
        for index in IMAGES:
            save_image(root / "images" / f"{index}.jpg", *image_size(index))
        write_coco(root, "train", document)
        if _prepare(root, Path(folder) / "a", "coco", caplog):
            return
        split = load_split(str(Path(folder) / "a" / "train"))
        assert split.num_samples + len(split.skipped) == len(document["images"])
        _check_coco_labels(document, Path(folder) / "a")
        assert _prepare(root, Path(folder) / "b", "coco", caplog) == 0
        assert _shard_bytes(Path(folder) / "a") == _shard_bytes(Path(folder) / "b")


VOC_IDS = ("a", "b c", "dé")
line_text = st.one_of(st.sampled_from([*VOC_IDS, "missing", "", "  a  "]), st.text(max_size=4))


@st.composite
def voc_files(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    bom = "\ufeff" if draw(st.booleans()) else ""
    lines = draw(st.lists(line_text, max_size=6))
    listing = (bom + newline.join(lines)).encode()
    if draw(st.integers(0, 9)) == 9:
        listing += b"\xff"
    classes = None
    if draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(["background", "round thing", "x", ""]), max_size=4))
        classes = newline.join(names).encode()
    return listing, classes


@FUZZ
@given(files=voc_files())
def test_random_voc_lists_lose_no_image_and_move_no_mask(
    files: tuple[bytes, bytes | None], caplog: pytest.LogCaptureFixture
) -> None:
    listing, classes = files
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "voc"
        for index, image_id in enumerate(VOC_IDS):
            save_image(root / "JPEGImages" / f"{image_id}.jpg", *image_size(index))
            save_mask(root / "SegmentationClass" / f"{image_id}.png", *image_size(index), index)
        (root / "ImageSets" / "Segmentation").mkdir(parents=True)
        (root / "ImageSets" / "Segmentation" / "train.txt").write_bytes(listing)
        if classes is not None:
            (root / "classes.txt").write_bytes(classes)
        if _prepare(root, Path(folder) / "a", "voc", caplog):
            return
        split = load_split(str(Path(folder) / "a" / "train"))
        lines = listing.decode("utf-8-sig").split("\n")
        assert split.num_samples + len(split.skipped) == sum(bool(line.strip()) for line in lines)
        for raw in split_samples(str(Path(folder) / "a" / "train")):
            sample = decode_sample(raw)
            index = [image_size(i) for i in range(len(VOC_IDS))].index(sample.image.size)
            assert set(np.unique(np.asarray(sample.mask))) == {index}, (
                "each image keeps its own mask"
            )
        assert _prepare(root, Path(folder) / "b", "voc", caplog) == 0
        assert _shard_bytes(Path(folder) / "a") == _shard_bytes(Path(folder) / "b")
