"""prepare-shards on a messy source: nothing valid lost, everything invalid reported."""

from __future__ import annotations

import io
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from storage_trees import upload_tree

from ladder_siam.cli import main as cli_main
from ladder_siam.data.manifest import load_split
from ladder_siam.data.tar_shards import iter_samples
from ladder_siam.io import storage
from ladder_siam.prep.prepare_shards import prepare_shards


def _jpeg(array: np.ndarray, **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90, **save_args)
    return buffer.getvalue()


def _png(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims 10 gigapixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))


def _noise(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# file -> expected skip reason (None: valid)
MESSY = {
    "train/cat/plain.jpg": None,
    "train/cat/UPPER CASE.JPG": None,
    "train/cat/ünïcødé 名前.jpeg": None,
    "train/cat/cmyk.jpg": None,
    "train/cat/exif_rotated.jpg": None,
    "train/dog/nested/deeper/gray16.png": None,
    "train/dog/palette_alpha.png": None,
    "train/dog/rgba.png": None,
    "train/dog/grayscale.png": None,
    "train/dog/huge.jpg": None,
    "train/dog/zero.jpg": "empty",
    "train/dog/truncated.jpg": "truncated",
    "train/dog/bomb.png": "decompression-bomb",
    "train/dog/fake.png": "not-an-image",
    "train/dog/notes.txt": "not-an-image",
    "train/README": "no-class",
    "val/cat/v0.jpg": None,
    "val/dog/v1.png": None,
}


@pytest.fixture
def messy_source(tmp_path: Path) -> Path:
    root = tmp_path / "messy"
    files: dict[str, bytes] = {
        "train/cat/plain.jpg": _jpeg(_noise(40, 60, 0)),
        "train/cat/UPPER CASE.JPG": _jpeg(_noise(50, 50, 1)),
        "train/cat/ünïcødé 名前.jpeg": _jpeg(_noise(30, 45, 2)),
        "train/dog/huge.jpg": _jpeg(_noise(1200, 1800, 3)),
        "train/dog/truncated.jpg": _jpeg(_noise(64, 64, 4))[:400],
        "train/dog/zero.jpg": b"",
        "train/dog/bomb.png": _bomb_png(),
        "train/dog/fake.png": b"this is not a png",
        "train/dog/notes.txt": b"some notes",
        "train/README": b"readme without a class",
        "val/cat/v0.jpg": _jpeg(_noise(32, 32, 5)),
        "val/dog/v1.png": _png(Image.fromarray(_noise(20, 24, 6))),
    }
    cmyk = Image.fromarray(_noise(40, 40, 7)).convert("CMYK")
    files["train/cat/cmyk.jpg"] = _encode(cmyk, "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    files["train/cat/exif_rotated.jpg"] = _jpeg(_noise(30, 70, 8), exif=exif.tobytes())
    sixteen = np.full((22, 33), 40000, dtype=np.uint16)
    files["train/dog/nested/deeper/gray16.png"] = _png(Image.fromarray(sixteen))
    palette = Image.fromarray(np.arange(600, dtype=np.uint8).reshape(20, 30) % 16, mode="P")
    palette.putpalette(list(range(48)) * 16)
    files["train/dog/palette_alpha.png"] = _png(palette, transparency=0)
    rgba = np.dstack([_noise(25, 25, 9), np.full((25, 25), 128, dtype=np.uint8)])
    files["train/dog/rgba.png"] = _png(Image.fromarray(rgba, mode="RGBA"))
    files["train/dog/grayscale.png"] = _png(Image.fromarray(_noise(20, 20, 10)[..., 0]))
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    assert set(files) == set(MESSY)
    return root


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _all_samples(dest: str, split: str) -> list[dict]:
    manifest = load_split(storage.join(dest, split))
    samples = []
    for uri in manifest.shard_uris():
        with storage.open_read(uri) as stream:
            samples.extend(iter_samples(stream))
    return samples


def test_messy_source_keeps_every_valid_input_and_reports_the_rest(
    messy_source: Path, tmp_path: Path
) -> None:
    dest = str(tmp_path / "shards")
    dataset = prepare_shards(str(messy_source), dest, shard_size=3, max_side=256, workers=2)

    train = load_split(storage.join(dest, "train"))
    expected_skips = {k: v for k, v in MESSY.items() if v and k.startswith("train/")}
    skipped = {s.source[len(str(messy_source)) + 1 :]: s.reason for s in train.skipped}
    assert skipped == expected_skips
    valid_train = [k for k, v in MESSY.items() if v is None and k.startswith("train/")]
    assert train.num_samples == len(valid_train) == sum(s.num_samples for s in train.shards)
    assert dataset.splits["val"].num_samples == 2
    assert train.classes == ["cat", "dog"]

    samples = _all_samples(dest, "train")
    assert len({s["__key__"] for s in samples}) == len(samples) == len(valid_train)
    labels = Counter(int(s["cls"]) for s in samples)
    assert labels == Counter(0 if "/cat/" in k else 1 for k in valid_train)

    decoded = [Image.open(io.BytesIO(s["jpg"])) for s in samples]
    assert all(image.format == "JPEG" and image.mode == "RGB" for image in decoded)
    sizes = Counter(image.size for image in decoded)
    assert sizes[(256, 171)] == 1, "huge.jpg is down-scaled to --max-side"
    assert sizes[(30, 70)] == 1, "the EXIF orientation is applied (70x30 stored -> 30x70)"
    plain = (messy_source / "train/cat/plain.jpg").read_bytes()
    assert any(s["jpg"] == plain for s in samples), "a clean RGB JPEG is stored untouched"
    gray16 = [np.asarray(im) for im in decoded if im.size == (33, 22)]
    assert gray16 and abs(float(gray16[0].mean()) - 40000 / 65535 * 255) < 3


def test_same_input_and_seed_give_identical_bytes(messy_source: Path, tmp_path: Path) -> None:
    first, second, other = (str(tmp_path / name) for name in ("a", "b", "c"))
    prepare_shards(str(messy_source), first, shard_size=4, workers=2, seed=7)
    prepare_shards(str(messy_source), second, shard_size=4, workers=1, seed=7)
    prepare_shards(str(messy_source), other, shard_size=4, workers=1, seed=8)

    def tree(root: str) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in Path(root).rglob("*.tar")}

    assert tree(first) == tree(second)
    assert tree(first).keys() == tree(other).keys()
    assert tree(first) != tree(other)
    assert (Path(first) / "manifest.json").read_bytes() == (
        Path(second) / "manifest.json"
    ).read_bytes()


def test_rerun_after_a_crash_reuses_finished_shards(
    messy_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ladder_siam.prep import prepare_shards as module

    dest = str(tmp_path / "shards")
    real_write = module.write_shard
    calls: list[str] = []
    armed = [True]

    def crash_on_third(task):
        calls.append(f"{task.split}/{task.name}")
        if armed[0] and len(calls) == 3:
            armed[0] = False
            raise RuntimeError("node lost")
        return real_write(task)

    monkeypatch.setattr(module, "write_shard", crash_on_third)
    with pytest.raises(RuntimeError, match="node lost"):
        prepare_shards(str(messy_source), dest, shard_size=2, workers=1)
    assert not (Path(dest) / "manifest.json").exists(), "no commit point after a crash"
    assert not list(Path(dest).rglob("*.tmp")), "no half-written files"

    calls.clear()
    manifest = prepare_shards(str(messy_source), dest, shard_size=2, workers=1)
    total_shards = sum(split.num_shards for split in manifest.splits.values())
    assert len(calls) == total_shards - 2, "the two finished shards are reused"

    clean = str(tmp_path / "clean")
    monkeypatch.setattr(module, "write_shard", real_write)
    prepare_shards(str(messy_source), clean, shard_size=2, workers=1)
    for path in Path(clean).rglob("*.tar"):
        assert (Path(dest) / path.relative_to(clean)).read_bytes() == path.read_bytes()

    calls.clear()
    monkeypatch.setattr(module, "write_shard", crash_on_third)
    prepare_shards(str(messy_source), dest, shard_size=2, workers=1)
    assert calls == [], "a rerun on unchanged input writes nothing"


def test_changed_input_invalidates_its_shard(messy_source: Path, tmp_path: Path) -> None:
    dest = str(tmp_path / "shards")
    prepare_shards(str(messy_source), dest, shard_size=100)
    before = (Path(dest) / "val/shard-000000.tar").read_bytes()
    (messy_source / "val/cat/v0.jpg").write_bytes(_jpeg(_noise(32, 32, 99)))
    prepare_shards(str(messy_source), dest, shard_size=100)
    assert (Path(dest) / "val/shard-000000.tar").read_bytes() != before


def test_shards_are_standard_webdataset(messy_source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    prepare_shards(str(messy_source), str(dest), shard_size=100)
    urls = [str(p) for p in sorted((dest / "train").glob("shard-*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls")
    records = list(dataset)
    assert len(records) == load_split(str(dest / "train")).num_samples
    assert all(image.mode == "RGB" and label in (0, 1) for image, label in records)


@pytest.mark.integration
@pytest.mark.slow
def test_s3_source_to_s3_shards(messy_source: Path, s3_bucket: str, tmp_path: Path) -> None:
    upload_tree(messy_source, f"{s3_bucket}/raw")
    local = str(tmp_path / "local")
    prepare_shards(str(messy_source), local, shard_size=3, workers=2)
    prepare_shards(f"{s3_bucket}/raw", f"{s3_bucket}/datasets/messy", shard_size=3, workers=2)

    for split in ("train", "val"):
        remote = load_split(f"{s3_bucket}/datasets/messy/{split}")
        assert remote.num_samples == load_split(f"{local}/{split}").num_samples
        for shard in remote.shards:
            local_bytes = (Path(local) / split / shard.uri).read_bytes()
            assert (
                storage.read_bytes(f"{s3_bucket}/datasets/messy/{split}/{shard.uri}") == local_bytes
            )
    assert load_split(f"{s3_bucket}/datasets/messy", "val").split == "val"


def test_cli_bad_input_exits_nonzero_with_a_clear_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    status = cli_main(
        ["prepare-shards", "--source", str(tmp_path / "absent"), "--dest", str(tmp_path / "out")]
    )
    assert status == 2
    assert "absent: no such directory" in caplog.text
    assert not (tmp_path / "out").exists()
    status = cli_main(
        ["prepare-shards", "--source", str(tmp_path), "--dest", "x", "--shard-size", "0"]
    )
    assert status == 2 and "--shard-size 0" in caplog.text
